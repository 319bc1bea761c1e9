"""`prospect chat`: a real terminal session through a pseudo-terminal, and the commands in process."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prospect.config import load_config
from prospect.data.example import Message

# The tiny-model builders live in test_export.py (pytest puts tests/ on sys.path).
from test_export import build_random_adapter, build_tiny_qwen, one_torch_thread  # noqa: F401 (autouse)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, smollm_tokenizer):
    """A tiny base model, an adapter trained (says its run_config) with the qwen template, and a config."""
    root = tmp_path_factory.mktemp("chat")
    base = build_tiny_qwen(root / "base", smollm_tokenizer)
    adapter = build_random_adapter(base, root / "adapter", seed=5, run_config={"template": "qwen"})
    config_file = root / "chat.yaml"
    config_file.write_text(
        f"model_name_or_path: {base}\nadapter_name_or_path: {adapter}\ntemperature: 0\nmax_new_tokens: 6\n"
    )
    return {"root": root, "base": base, "adapter": adapter, "config": config_file}


def reply_function(config_file: Path):
    """What the model answers to a conversation, computed without the chat loop (greedy, same template)."""
    from prospect.inference import generate_replies, load_inference_model

    model, tokenizer, template = load_inference_model(load_config(str(config_file)), merge=True)
    assert template.name == "qwen"  # the adapter's run_config, not the tokenizer's own (SmolLM2's)
    return lambda messages: generate_replies(model, tokenizer, template, [messages], max_new_tokens=6)[0]


# --------------------------------------------------------------------------------------------------
# Through a pseudo-terminal

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


class Terminal:
    """`prospect chat` on a pseudo-terminal: what a user at a keyboard would see and type."""

    def __init__(self, args: list[str], cwd: Path):
        import fcntl
        import pty
        import struct
        import termios

        self.master, slave = pty.openpty()
        # A wide terminal, so that readline never wraps or redraws the line being typed.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 500, 0, 0))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1"}  # see one_torch_thread
        self.process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                        close_fds=True, start_new_session=True)
        os.close(slave)
        self.output = b""

    def text(self) -> str:
        return ANSI_ESCAPE.sub("", self.output.decode("utf-8", errors="replace")).replace("\r", "")

    def read_until(self, needle: str, start: int, timeout: float = 60.0) -> str:
        """Read until `needle` appears after character `start` of the cleaned output; return that output."""
        deadline = time.monotonic() + timeout
        while needle not in self.text()[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and not self._drain(0.2):
                raise AssertionError(f"never saw {needle!r}; output so far:\n{self.text()}")
            self._drain(min(remaining, 0.5))
        return self.text()

    def _drain(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.output += chunk
        return bool(chunk)

    def type(self, data: str) -> None:
        os.write(self.master, data.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_chat_in_a_pseudo_terminal_two_turns_reset_and_eof(chat_model):
    reply = reply_function(chat_model["config"])
    first = reply([Message("user", "Hello there")])
    second = reply([Message("user", "Hello there"), Message("assistant", first), Message("user", "How are you?")])
    after_reset = reply([Message("user", "How are you?")])

    terminal = Terminal([sys.executable, "-m", "prospect", "chat", str(chat_model["config"])], ROOT)
    try:
        seen = terminal.read_until("User: ", 0)
        assert "template qwen; greedy" in seen
        mark = len(seen)
        terminal.type("Hello there\n")
        seen = terminal.read_until("User: ", mark)
        assert f"Assistant: {first}".replace("\r", "") in seen[mark:]
        mark = len(seen)
        terminal.type("How are you?\n")
        seen = terminal.read_until("User: ", mark)
        assert f"Assistant: {second}".replace("\r", "") in seen[mark:]  # the first turn was in the history
        mark = len(seen)
        terminal.type("/reset\n")
        seen = terminal.read_until("User: ", mark)
        assert "(conversation cleared)" in seen[mark:]
        mark = len(seen)
        terminal.type("How are you?\n")
        seen = terminal.read_until("User: ", mark)
        assert f"Assistant: {after_reset}".replace("\r", "") in seen[mark:]
        mark = len(seen)
        terminal.type("\x04")  # Ctrl-D on an empty line: end of input
        terminal.read_until("Bye.", mark)
        assert terminal.process.wait(timeout=30) == 0
    finally:
        terminal.close()


# --------------------------------------------------------------------------------------------------
# The commands, in process


def test_system_prompt_tools_and_tool_answers(chat_model, monkeypatch, tmp_path):
    import prospect.inference
    from prospect.chat import chat
    from prospect.inference import Generated

    prompts: list[str] = []
    real_generate = prospect.inference.generate_batch

    def scripted_generate(model, tokenizer, prompt_ids, **kwargs):
        """The real generation, except that with tools offered the first reply is a tool call."""
        text = tokenizer.decode(prompt_ids[0])
        prompts.append(text)
        if "<tools>" in text and "<tool_response>" not in text:
            call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            kwargs["on_text"](0, call)
            return [Generated(call, [], "stop", 5)]
        return real_generate(model, tokenizer, prompt_ids, **kwargs)

    monkeypatch.setattr(prospect.inference, "generate_batch", scripted_generate)
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]))
    lines = ["/system You are terse.", "Hi", "/tool 21 C", f"/tools {tools_file}", "Weather in Paris?",
             "/tool {\"temp_c\": 21}", "/frobnicate", "/exit", "never read"]
    out = io.StringIO()
    chat(load_config(str(chat_model["config"])), stdin=io.StringIO("\n".join(lines) + "\n"), out=out)
    text = out.getvalue()

    assert "(system prompt: 'You are terse.')" in text
    assert prompts[0].startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    assert "(/tool answers a tool call, and the model has not made one)" in text
    assert "(tools: get_weather)" in text
    assert '-> tool call: get_weather({"city": "Paris"})' in text
    # The tool's answer goes back as an observation after the call, and the model goes on.
    assert prompts[-1].endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert "(unknown command /frobnicate; /help lists them)" in text
    assert text.rstrip().endswith("Bye.") and len(prompts) == 3


def test_batched_replies_equal_replies_one_at_a_time(chat_model):
    """generate_replies (what chat, serve and eval share) left-pads prompts of different lengths."""
    from prospect.inference import generate_replies, load_inference_model

    model, tokenizer, template = load_inference_model(load_config(str(chat_model["config"])))
    conversations = [[Message("user", text)] for text in
                     ["Hi", "A much longer question, with many more tokens than the others, about rivers?", "2 + 2?"]]
    one_by_one = generate_replies(model, tokenizer, template, conversations, max_new_tokens=6, batch_size=1)
    batched = generate_replies(model, tokenizer, template, conversations, max_new_tokens=6, batch_size=3)
    assert batched == one_by_one and len(set(batched)) == 3
