"""The OpenAI Chat Completions wire format of `prospect serve`: request parsing and validation (errors
in the OpenAI shape), the models a request can name, and the pieces of a response (tool calls,
usage, server-sent events, holding back a streamed tool call). No model and no HTTP server here:
`prospect.serve` runs them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from prospect.data.example import Message
from prospect.data.tool_calls import TOOL_CALL_OPEN, ToolCall, parse_tool_calls


# --------------------------------------------------------------------------------------------------
# Errors in the OpenAI shape


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {...}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------------
# What a request can name


@dataclass
class ServedModel:
    name: str  # the `model` field of requests
    adapter_key: str  # the PEFT adapter name, or BASE_MODEL
    template: Any  # prospect.data.templates.Template
    path: str  # where it was loaded from (shown by /v1/models)
    created: int = field(default_factory=lambda: int(time.time()))


# --------------------------------------------------------------------------------------------------
# Requests


@dataclass
class ChatRequest:
    model: ServedModel
    messages: list[Message]
    tools: list[dict]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{key}' must be a number, got {json.dumps(value)}.", key)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"'{key}' must be in {bound}, got {value}.", key)
    return float(value)


def _text_content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content: only text parts ({{'type': 'text', 'text': ...}}) are supported.",
                           f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{where}.content must be a string or a list of text parts.", f"{where}.content")


def _tool_calls_message(calls: Any, where: str) -> Message:
    """An assistant message's OpenAI `tool_calls` as a canonical function_call turn."""
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"{where}.tool_calls must be a non-empty list.", f"{where}.tool_calls")
    payload = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{index}] needs a function with a string name.",
                       f"{where}.tool_calls[{index}]")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as the string the client sent
        payload.append({"name": function["name"], "arguments": arguments})
    return Message("function_call", json.dumps(payload, ensure_ascii=False))


def parse_messages(raw: Any) -> list[Message]:
    """OpenAI messages as canonical prospect messages (tool calls → function_call, tool → observation)."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list of messages.", "messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'.", where)
        role = message.get("role")
        if role in ("system", "developer"):
            messages.append(Message("system", _text_content(message.get("content"), where)))
        elif role == "user":
            messages.append(Message("user", _text_content(message.get("content"), where)))
        elif role == "assistant":
            if message.get("tool_calls"):
                # The content next to tool calls is dropped: the templates write a call turn as calls only.
                messages.append(_tool_calls_message(message["tool_calls"], where))
            else:
                messages.append(Message("assistant", _text_content(message.get("content"), where)))
        elif role == "tool":
            messages.append(Message("observation", _text_content(message.get("content"), where)))
        else:
            raise bad_request(f"{where}.role must be one of system, developer, user, assistant, tool; got {role!r}.",
                       f"{where}.role")
    return messages


def _parse_tools(body: dict) -> list[dict]:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of {'type': 'function', 'function': {...}} objects.", "tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}.",
                       f"tools[{index}]")
    return tools


def parse_request(body: Any, models: dict[str, ServedModel], config) -> ChatRequest:
    """Validate a chat completions body; raise ApiError (4xx) with what is wrong."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise bad_request(f"'model' is required: one of {', '.join(models)}.", "model")
    if name not in models:
        raise ApiError(404, f"The model {name!r} does not exist; this server has {', '.join(models)}.",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise bad_request("Only n=1 is supported.", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad_request(f"'max_tokens' must be a positive integer, got {json.dumps(max_tokens)}.", "max_tokens")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("'stop' must be a string or a list of strings.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad_request("'stream' must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    return ChatRequest(
        model=models[name],
        messages=parse_messages(body.get("messages")),
        tools=_parse_tools(body),
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", config.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", config.top_p, 0.0, 1.0, low_open=True),
        stop=[s for s in (stop or []) if s],
    )


# --------------------------------------------------------------------------------------------------
# Streaming with tools: hold back what may be a tool call


class ToolCallHoldback:
    """Passes streamed text through, except anything from a (possible) `<tool_call>` on.

    While the reply might still turn into a tool call, the text is held back: a trailing piece that
    could be the start of `<tool_call>`, and trailing whitespace (which a tool call would strip).
    Once `<tool_call>` appears, nothing more is streamed as content; `finish` then parses the calls.
    """

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.in_call = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.in_call:
            return ""
        at = self.text.find(TOOL_CALL_OPEN, self.sent)
        if at >= 0:
            self.in_call = True
            end = at
        else:
            end = len(self.text)
            for size in range(min(len(TOOL_CALL_OPEN) - 1, end - self.sent), 0, -1):
                if self.text.endswith(TOOL_CALL_OPEN[:size]):
                    end -= size
                    break
        end = self.sent + len(self.text[self.sent : end].rstrip())
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not streamed yet, tool calls)."""
        _, calls = parse_tool_calls(self.text)
        if calls:
            return "", calls
        rest = self.text[self.sent :]
        self.sent = len(self.text)
        return rest, []
