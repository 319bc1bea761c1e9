"""`prospect chat`: talk to the base model + adapter(s), or to an exported model, in the terminal.

The model answers with the template it was trained with (see `prospect.inference`), its reply
streamed token by token, the whole conversation kept as history. Sampling follows the config's
`temperature` (0 = greedy), `top_p` and `max_new_tokens`, which can be given on the command line:
`prospect chat my.yaml temperature=0 max_new_tokens=128`.

Commands (typed instead of a message):

    /reset            forget the conversation (the system prompt and tools stay)
    /system TEXT      set the system prompt; `/system` alone goes back to the default
    /tools FILE.json  offer the tools of FILE (a JSON list of OpenAI tool definitions); `/tools` alone: none
    /tool TEXT        answer the model's last tool call with TEXT (the tool's result); the model goes on
    /help             this list
    /exit             quit (so does Ctrl-D); Ctrl-C stops a reply that is being written

With tools offered, a reply made of `<tool_call>` blocks is shown as the calls it makes; answer
them with `/tool`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from prospect.data.example import Message
from prospect.errors import UserError

COMMANDS_HELP = """\
/reset            forget the conversation (the system prompt and tools stay)
/system TEXT      set the system prompt; /system alone goes back to the default
/tools FILE.json  offer the tools of FILE (JSON list of tool definitions); /tools alone: none
/tool TEXT        answer the model's tool call with TEXT (the tool's result)
/help             this list
/exit             quit (so does Ctrl-D); Ctrl-C stops a reply being written"""


class ChatSession:
    """The conversation and the commands; `prospect chat` reads lines and hands them to `handle`."""

    def __init__(self, model, tokenizer, template, *, max_new_tokens: int, temperature: float, top_p: float,
                 out: TextIO = sys.stdout):
        from prospect.inference import context_length, stop_token_ids

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.out = out
        self.stop_ids = stop_token_ids(tokenizer, template, model)
        self.max_context = context_length(model, tokenizer)
        self.system: str | None = None  # None: the template's default system prompt
        self.tools: list[dict] = []
        self.history: list[Message] = []

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system is not None else []) + self.history

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ----------------------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Act on one input line; False means quit."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/"):
            self.history.append(Message("user", line.rstrip("\n")))
            self.reply()
            return True
        command, _, argument = text.partition(" ")
        argument = argument.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif command == "/system":
            self.system = argument or None
            self.say(f"(system prompt: {argument!r})" if argument else "(system prompt: the template's default)")
        elif command == "/tools":
            self.tools = self._read_tools(argument) if argument else []
            self.say(f"(tools: {', '.join(_tool_name(t) for t in self.tools) or 'none'})")
        elif command == "/tool":
            if not self.history or self.history[-1].role not in ("function_call", "observation"):
                self.say("(/tool answers a tool call, and the model has not made one)")
            else:
                self.history.append(Message("observation", argument))
                self.reply()
        elif command == "/help":
            self.say(COMMANDS_HELP)
        else:
            self.say(f"(unknown command {command}; /help lists them)")
        return True

    def _read_tools(self, path: str) -> list[dict]:
        try:
            tools = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            self.say(f"(cannot read tools from {path}: {err})")
            return self.tools
        if isinstance(tools, dict):
            tools = [tools]
        if not isinstance(tools, list) or not all(isinstance(t, dict) and _tool_name(t) for t in tools):
            self.say(f"({path} must hold a JSON list of tool definitions with a name each)")
            return self.tools
        return tools

    def reply(self) -> str:
        """Generate the assistant's next turn, streaming it to `out`, and add it to the history."""
        from prospect.data.tool_calls import parse_tool_calls, tool_calls_as_message
        from prospect.inference import encode_prompt, generate_batch, render_prompt

        try:
            prompt = encode_prompt(self.tokenizer, render_prompt(self.template, self.messages(), self.tools))
        except UserError as err:
            self.history.pop()
            self.say(f"(cannot format this conversation: {err})")
            return ""
        budget = self.max_new_tokens
        if self.max_context is not None:
            budget = min(budget, self.max_context - len(prompt))
            if budget <= 0:
                self.history.pop()
                self.say(f"(the conversation fills the model's {self.max_context}-token context: /reset to go on)")
                return ""
        pieces: list[str] = []

        def show(row: int, text: str) -> None:
            pieces.append(text)
            self.out.write(text)
            self.out.flush()

        self.out.write("Assistant: ")
        self.out.flush()
        try:
            result = generate_batch(
                self.model, self.tokenizer, [prompt], max_new_tokens=budget, temperature=self.temperature,
                top_p=self.top_p, stop_ids=self.stop_ids, on_text=show,
            )[0]
            text, note = result.text, " [max_new_tokens reached]" if result.finish_reason == "length" else ""
        except KeyboardInterrupt:
            text, note = "".join(pieces), " [stopped]"
        self.say(note)
        content, calls = parse_tool_calls(text) if self.tools else (text, [])
        if calls:
            self.history.append(tool_calls_as_message(calls))
            for call in calls:
                self.say(f"  -> tool call: {call.name}({call.arguments})")
            self.say("  (answer with /tool RESULT)")
        else:
            self.history.append(Message("assistant", text))
        return text


def _tool_name(tool: dict) -> str:
    function = tool.get("function", tool)
    return function.get("name", "") if isinstance(function, dict) else ""


def _quiet_libraries() -> None:
    """Keep the terminal for the conversation: no progress bars or advice from the libraries."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def chat(config, *, stdin: TextIO | None = None, out: TextIO = sys.stdout) -> None:
    """`prospect chat`: load the model, then read messages until /exit or end of input."""
    from prospect.inference import load_inference_model, parse_adapters

    _quiet_libraries()
    adapters = parse_adapters(config.adapter_name_or_path)
    what = config.model_name_or_path + "".join(f" + {a.name}" for a in adapters)
    print(f"Loading {what} ...", file=out, flush=True)
    model, tokenizer, template = load_inference_model(config, merge=True)
    session = ChatSession(model, tokenizer, template, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_p=config.top_p, out=out)
    sampling = "greedy" if config.temperature == 0 else f"temperature {config.temperature:g}, top_p {config.top_p:g}"
    session.say(f"Chatting with {what} (template {template.name}; {sampling}; up to {config.max_new_tokens} "
                "tokens a reply). /help lists the commands; Ctrl-D or /exit quits.")
    interactive = stdin is None and sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = _read_line("User: ", stdin, out)
        except EOFError:
            session.say("")
            break
        except KeyboardInterrupt:
            session.say("\n(Ctrl-D or /exit quits)")
            continue
        if not session.handle(line):
            break
    session.say("Bye.")


def _read_line(prompt: str, stdin: TextIO | None, out: TextIO) -> str:
    if stdin is None:
        return input(prompt)
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line
