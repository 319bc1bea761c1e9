"""Chat templates: render a canonical conversation to text and mark which characters are trained.

A template turns `Example.messages` (+ `Example.tools`) into the exact text the model sees, and
returns the character spans of every trained turn (assistant and function_call turns). A span
covers the turn's content and its end-of-turn token (`content<|im_end|>`, `content<|eot_id|>`);
it excludes the role header (so the model is not trained to write the header it is given) and the
newline some templates put after the end-of-turn token (never generated: generation stops at it).
`prospect.data.encode` tokenizes the whole text once and maps these spans onto tokens.

Templates (`get_template(name, tokenizer)`):

- ``qwen``: Qwen2.5-Instruct, byte-identical to its official Jinja template, tools included. The
  tools go into the system turn ("# Tools" section, one JSON object per line inside `<tools>`),
  a function call is an assistant turn of `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
  blocks, and observations are `<tool_response>` blocks inside a user turn; consecutive
  observations share one user turn, as the official template does. Default system prompt:
  "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
- ``llama3``: Llama-3-Instruct (`<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>`),
  content trimmed of surrounding whitespace like the official template (`| trim`), `<|begin_of_text|>`
  first. No default system prompt.
- ``chatml``: `<|im_start|>role\\ncontent<|im_end|>\\n`; no default system prompt unless given
  (`default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"` gives
  SmolLM2-Instruct's template).
- ``auto`` (or None): the tokenizer's own Jinja chat template, via `tokenizer.apply_chat_template`.
  Trained spans are found by rendering prefixes: rendering messages[:i] with the generation prompt
  must give a prefix of the rendering of messages[:i+1]; the difference is turn i.

Llama-3 and ChatML have no native tool format, so the named `llama3` and `chatml` templates borrow
Qwen's: the tools are appended to the system message with the same "# Tools" wording, a function
call is the assistant content `<tool_call>\\n{json}\\n</tool_call>` (one block per call, joined by a
newline), and an observation is its own turn with role ``ipython`` (llama3) or ``tool`` (chatml).

Tools are rendered in the OpenAI layout `{"type": "function", "function": {...}}`: a bare
`{"name", "description", "parameters"}` definition (as in glaive-style data) is wrapped, which is
what an OpenAI-compatible server passes to the template at inference time. Tool-call arguments
given as a JSON string are parsed to an object, so the model learns to write `"arguments": {...}`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prospect.data.example import TRAINED_ROLES, Message
from prospect.errors import UserError

KNOWN_TEMPLATES = ("auto", "chatml", "llama3", "qwen")

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# End-of-turn tokens looked for in an "auto" template's assistant turn when the tokenizer's
# eos_token is not there (e.g. Llama-3's first revision has eos <|end_of_text|>, turns end <|eot_id|>).
_COMMON_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


# --------------------------------------------------------------------------------------------------
# Rendering result


@dataclass(frozen=True)
class TrainedSpan:
    """Characters `text[start:end]` of turn `messages[message_index]` that carry the loss."""

    start: int
    end: int
    message_index: int


@dataclass(frozen=True)
class RenderedChat:
    """The full text of a conversation and the spans of its trained turns, in order."""

    text: str
    trained_spans: tuple[TrainedSpan, ...]

    def span_texts(self) -> list[str]:
        return [self.text[s.start : s.end] for s in self.trained_spans]


class _TextBuilder:
    """Accumulates rendered text and records which appended pieces are trained."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self._spans: list[TrainedSpan] = []

    def add(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)

    def add_trained(self, text: str, message_index: int) -> None:
        self._spans.append(TrainedSpan(self._length, self._length + len(text), message_index))
        self.add(text)

    def build(self) -> RenderedChat:
        return RenderedChat("".join(self._parts), tuple(self._spans))


# --------------------------------------------------------------------------------------------------
# Tools and tool calls (shared by all templates and by chat/serve code)


def _tojson(value: Any) -> str:
    """JSON exactly as transformers' Jinja `tojson` filter writes it (non-ASCII kept as is)."""
    return json.dumps(value, ensure_ascii=False)


def to_hf_tools(tools: Sequence[dict]) -> list[dict]:
    """Tool definitions in the OpenAI layout; a bare schema becomes {"type": "function", "function": schema}."""
    return [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools]


def parse_function_call(content: str, origin: str = "") -> list[dict]:
    """Parse a function_call turn into a list of {"name": str, "arguments": object}.

    The content is a JSON object {"name", "arguments"} or a JSON list of them. Arguments given as a
    JSON string holding an object are parsed into that object.
    """
    where = f"{origin}: " if origin else ""
    hint = 'write it as {"name": "...", "arguments": {...}} or a JSON list of such objects'
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}a function_call message is not valid JSON ({err}); {hint}") from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        raise UserError(f"{where}a function_call message holds an empty list of calls; {hint}")
    normalized = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise UserError(f"{where}a function_call message lacks a string 'name' or an 'arguments' field; {hint}")
        arguments = call["arguments"]
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict):
                arguments = decoded
        normalized.append({"name": call["name"], "arguments": arguments})
    return normalized


def format_tool_call(call: dict) -> str:
    """One call as Qwen2.5 writes it: '{"name": "<name>", "arguments": <json>}' (the name is not escaped)."""
    return '{"name": "' + call["name"] + '", "arguments": ' + _tojson(call["arguments"]) + "}"


def format_tool_call_blocks(calls: Sequence[dict]) -> str:
    """The calls as `<tool_call>` blocks separated by newlines (the content of a function-call turn)."""
    return "\n".join("<tool_call>\n" + format_tool_call(call) + "\n</tool_call>" for call in calls)


def format_tools_section(tools: Sequence[dict]) -> str:
    """The "# Tools" system-prompt section of Qwen2.5, listing `tools` (already in OpenAI layout)."""
    listing = "".join("\n" + _tojson(tool) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
        + listing
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def to_hf_messages(messages: Sequence[Message], origin: str = "") -> list[dict]:
    """Canonical messages as the OpenAI/Hugging Face chat format that Jinja chat templates expect.

    function_call -> {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
    "function": {"name", "arguments": object}}]}; observation -> {"role": "tool", "content": ...}.
    """
    converted: list[dict] = []
    for message in messages:
        if message.role == "function_call":
            calls = parse_function_call(message.content, origin)
            converted.append(
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"type": "function", "function": call} for call in calls],
                }
            )
        elif message.role == "observation":
            converted.append({"role": "tool", "content": message.content})
        else:
            converted.append({"role": message.role, "content": message.content})
    return converted


# --------------------------------------------------------------------------------------------------
# Templates


class Template(ABC):
    """Renders canonical conversations; see the module docstring for the formats."""

    name: str
    end_of_turn: str  # the token that ends a turn (generation stops at it)
    required_tokens: tuple[str, ...] = ()  # markers that must be single tokens of the tokenizer

    @abstractmethod
    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict] = (),
        *,
        add_generation_prompt: bool = False,
        origin: str = "",
    ) -> RenderedChat:
        """Full text of the conversation (+ the assistant header when `add_generation_prompt`) and
        the trained spans. `origin` ("file#index") is only used in error messages."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _system_text(messages: Sequence[Message], default_system: str | None) -> tuple[str | None, int]:
    """(system prompt or None, index of the first message after it)."""
    if messages and messages[0].role == "system":
        return messages[0].content, 1
    return default_system, 0


class QwenTemplate(Template):
    """Qwen2.5-Instruct's official template written out in Python (see the module docstring)."""

    name = "qwen"
    end_of_turn = "<|im_end|>"
    required_tokens = ("<|im_start|>", "<|im_end|>")

    def __init__(self, default_system: str | None = None) -> None:
        self.default_system = QWEN_DEFAULT_SYSTEM if default_system is None else default_system

    def render(self, messages, tools=(), *, add_generation_prompt=False, origin=""):
        out = _TextBuilder()
        system, _ = _system_text(messages, self.default_system)
        if tools:
            tools_section = format_tools_section(to_hf_tools(tools))
            out.add("<|im_start|>system\n" + system + "\n\n" + tools_section + "<|im_end|>\n")
        else:
            out.add("<|im_start|>system\n" + system + "<|im_end|>\n")
        for index, message in enumerate(messages):
            role = message.role
            if role == "system" and index == 0:
                continue  # already rendered above
            if role in ("user", "system", "assistant"):
                out.add(f"<|im_start|>{role}\n")
                if role == "assistant":
                    out.add_trained(message.content + "<|im_end|>", index)
                else:
                    out.add(message.content + "<|im_end|>")
                out.add("\n")
            elif role == "function_call":
                calls = parse_function_call(message.content, origin)
                out.add("<|im_start|>assistant\n")
                out.add_trained(format_tool_call_blocks(calls) + "<|im_end|>", index)
                out.add("\n")
            elif role == "observation":
                # Consecutive observations share one user turn, each in its own <tool_response>.
                if index == 0 or messages[index - 1].role != "observation":
                    out.add("<|im_start|>user")
                out.add("\n<tool_response>\n" + message.content + "\n</tool_response>")
                if index == len(messages) - 1 or messages[index + 1].role != "observation":
                    out.add("<|im_end|>\n")
            else:
                raise _unknown_role(role, origin)
        if add_generation_prompt:
            out.add("<|im_start|>assistant\n")
        return out.build()


class ChatMLTemplate(Template):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` turns; tools the Qwen way (see the module docstring)."""

    name = "chatml"
    end_of_turn = "<|im_end|>"
    required_tokens = ("<|im_start|>", "<|im_end|>")
    observation_role = "tool"

    def __init__(self, default_system: str | None = None) -> None:
        self.default_system = default_system

    def _turn_header(self, role: str) -> str:
        return f"<|im_start|>{role}\n"

    def _turn_content(self, content: str) -> str:
        return content

    def _begin(self, out: _TextBuilder) -> None:
        pass

    def render(self, messages, tools=(), *, add_generation_prompt=False, origin=""):
        out = _TextBuilder()
        self._begin(out)
        system, first = _system_text(messages, self.default_system)
        if tools:
            tools_section = format_tools_section(to_hf_tools(tools))
            system = tools_section if not system else system + "\n\n" + tools_section
        if system is not None:
            out.add(self._turn_header("system") + self._turn_content(system) + self.end_of_turn)
            out.add(self._after_turn())
        for index in range(first, len(messages)):
            message = messages[index]
            role = message.role
            if role in ("user", "system"):
                out.add(self._turn_header(role) + self._turn_content(message.content) + self.end_of_turn)
            elif role == "observation":
                out.add(
                    self._turn_header(self.observation_role) + self._turn_content(message.content) + self.end_of_turn
                )
            elif role in TRAINED_ROLES:
                if role == "function_call":
                    content = format_tool_call_blocks(parse_function_call(message.content, origin))
                else:
                    content = message.content
                out.add(self._turn_header("assistant"))
                out.add_trained(self._turn_content(content) + self.end_of_turn, index)
            else:
                raise _unknown_role(role, origin)
            out.add(self._after_turn())
        if add_generation_prompt:
            out.add(self._turn_header("assistant"))
        return out.build()

    def _after_turn(self) -> str:
        return "\n"


class Llama3Template(ChatMLTemplate):
    """Llama-3-Instruct's official template (content trimmed, as its `| trim` does); tools the Qwen way."""

    name = "llama3"
    end_of_turn = "<|eot_id|>"
    required_tokens = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    observation_role = "ipython"

    def _turn_header(self, role: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

    def _turn_content(self, content: str) -> str:
        return content.strip()  # Jinja's `trim` is Python's str.strip()

    def _begin(self, out: _TextBuilder) -> None:
        out.add("<|begin_of_text|>")

    def _after_turn(self) -> str:
        return ""


def _unknown_role(role: str, origin: str) -> UserError:
    where = f"{origin}: " if origin else ""
    return UserError(
        f"{where}unknown message role {role!r}; expected one of system, user, assistant, function_call, observation"
    )


class JinjaTemplate(Template):
    """The tokenizer's own chat template ("auto"), rendered by `tokenizer.apply_chat_template`.

    Trained spans come from prefix renders: text(messages[:i], generation prompt) must be a prefix
    of text(messages[:i+1]); the rest, up to and including the end-of-turn token, is turn i.
    """

    name = "auto"

    def __init__(self, tokenizer, default_system: str | None = None, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if isinstance(self.chat_template, dict):  # several named templates: use the default one
            self.chat_template = self.chat_template.get("default")
        if not self.chat_template:
            raise UserError(
                "the tokenizer has no chat template, so `template: auto` cannot be used; "
                f"set `template:` to one of {', '.join(n for n in KNOWN_TEMPLATES if n != 'auto')}"
            )
        self.supports_tools = "tools" in self.chat_template or "tool_calls" in self.chat_template
        eos = getattr(tokenizer, "eos_token", None)
        self._end_of_turn_candidates = tuple(dict.fromkeys(([eos] if eos else []) + list(_COMMON_END_OF_TURN_TOKENS)))
        self.end_of_turn = eos or ""

    def _apply(self, hf_messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            hf_messages,
            tools=tools,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def _end_of_turn_in(self, turn_text: str) -> int:
        """Length of `turn_text` up to and including its end-of-turn token (eos first, else the earliest known one)."""
        eos, *others = self._end_of_turn_candidates
        if eos in turn_text:
            return turn_text.index(eos) + len(eos)
        found = [(turn_text.index(token), -len(token), token) for token in others if token in turn_text]
        if not found:
            return len(turn_text.rstrip())
        position, _, token = min(found)
        return position + len(token)

    def render(self, messages, tools=(), *, add_generation_prompt=False, origin=""):
        where = f"{origin}: " if origin else ""
        uses_tools = bool(tools) or any(m.role in ("function_call", "observation") for m in messages)
        if uses_tools and not self.supports_tools:
            raise UserError(
                f"{where}the data has tools or function calls but the tokenizer's chat template ignores tools; "
                "set `template: qwen` (or llama3 / chatml, which write tools in Qwen's format)"
            )
        hf_messages = to_hf_messages(messages, origin)
        offset = 0  # hf index = canonical index + offset
        if self.default_system is not None and not (messages and messages[0].role == "system"):
            hf_messages.insert(0, {"role": "system", "content": self.default_system})
            offset = 1
        hf_tools = to_hf_tools(tools) or None
        try:
            text = self._apply(hf_messages, hf_tools, add_generation_prompt)
            spans = []
            for index, message in enumerate(messages):
                if message.role not in TRAINED_ROLES:
                    continue
                hf_index = index + offset
                if hf_index == 0:
                    raise UserError(
                        f"{where}the conversation starts with an assistant turn, which `template: auto` cannot "
                        "locate; start with a user turn or set `template:` to a named template"
                    )
                prompt = self._apply(hf_messages[:hf_index], hf_tools, True)
                with_turn = self._apply(hf_messages[: hf_index + 1], hf_tools, False)
                turn_end = len(prompt) + self._end_of_turn_in(with_turn[len(prompt) :])
                if not with_turn.startswith(prompt) or not text.startswith(with_turn[:turn_end]):
                    raise UserError(
                        f"{where}the tokenizer's chat template does not render conversations prefix by prefix "
                        f"(message {index}), so the trained turns cannot be located; set `template:` to one of "
                        "qwen, llama3, chatml"
                    )
                spans.append(TrainedSpan(len(prompt), turn_end, index))
        except UserError:
            raise
        except Exception as err:  # Jinja errors raised by the template itself (raise_exception, bad roles)
            raise UserError(
                f"{where}the tokenizer's chat template failed on this conversation ({type(err).__name__}: {err}); "
                "fix the conversation or set `template:` to one of qwen, llama3, chatml"
            ) from None
        return RenderedChat(text, tuple(spans))


# --------------------------------------------------------------------------------------------------


_NAMED_TEMPLATES: dict[str, type[Template]] = {
    "chatml": ChatMLTemplate,
    "llama3": Llama3Template,
    "qwen": QwenTemplate,
}


def _check_special_tokens(template_name: str, required: Sequence[str], tokenizer) -> None:
    """A named template's markers must be single tokens, else the model never sees a real end-of-turn."""
    missing = [t for t in required if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise UserError(
            f"template {template_name!r} needs the special tokens {', '.join(missing)}, which this tokenizer "
            "does not have; set `template:` to the one the model was trained with (or `auto`)"
        )


def get_template(name: str | None, tokenizer, default_system: str | None = None) -> Template:
    """The template called `name` ("qwen", "llama3", "chatml", or "auto"/None for the tokenizer's own).

    `default_system` is the system prompt used when a conversation has none (qwen falls back to
    Qwen's own default). For named templates, `tokenizer` (may be None) is only checked to have the
    template's special tokens.
    """
    key = "auto" if name is None else str(name).strip().lower()
    if key in ("auto", ""):
        return JinjaTemplate(tokenizer, default_system)
    if key not in _NAMED_TEMPLATES:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(KNOWN_TEMPLATES)}")
    template_class = _NAMED_TEMPLATES[key]
    if tokenizer is not None:
        _check_special_tokens(key, template_class.required_tokens, tokenizer)
    return template_class(default_system)
