"""Tool calls in one place: how tools and calls are written, and how calls are read back.

Every named template writes tools the way Qwen2.5 does, so this is the one format `prospect` trains
and serves:

- the tools go into the system prompt as a "# Tools" section, one JSON definition per line inside
  `<tools></tools>` (`TOOLS_JINJA`'s `tools_section` macro);
- a call is `<tool_call>\\n{"name": "<name>", "arguments": <json>}\\n</tool_call>`, several calls
  separated by a newline (`TOOLS_JINJA`'s `tool_call_block` macro);
- `parse_tool_calls` reads such blocks back out of a model's reply (chat and serve).

The templates in `prospect.data.templates` include `TOOLS_JINJA` and render conversations in the
OpenAI / Hugging Face layout (`to_hf_messages`, `to_hf_tools`): a function_call turn of the data is
an assistant turn with `tool_calls`, an observation a `tool` turn. The tags below are the ones the
parser and the streaming hold-back of serve look for.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prospect.data.example import Message
from prospect.errors import UserError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

# Jinja macros the named templates include. `tojson` writes non-ASCII as is (transformers' filter).
TOOLS_JINJA = r"""
{%- macro tools_section(tools) %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {%- if tool.type == 'function' %}
            {{- '\n' + tool | tojson }}
        {%- else %}
            {{- '\n' + {'type': 'function', 'function': tool} | tojson }}
        {%- endif %}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' }}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' }}
    {{- '\n</tool_call>' }}
{%- endmacro %}
{%- macro tool_call_block(call) %}
    {%- if call.function is defined %}
        {%- set call = call.function %}
    {%- endif %}
    {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
    {%- if call.arguments is string %}
        {{- call.arguments }}
    {%- else %}
        {{- call.arguments | tojson }}
    {%- endif %}
    {{- '}\n</tool_call>' }}
{%- endmacro %}
"""

_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)",
                              re.DOTALL)


def to_hf_tools(tools: Sequence[dict]) -> list[dict]:
    """Tool definitions in the OpenAI layout; a bare schema becomes {"type": "function", "function": schema}."""
    return [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools]


def parse_function_call(content: str, origin: str = "") -> list[dict]:
    """Parse a function_call turn of the training data into a list of {"name": str, "arguments": object}.

    The content is a JSON object {"name", "arguments"} or a JSON list of them. Arguments given as a
    JSON string holding an object are parsed into that object, so the model learns `"arguments": {...}`.
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


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON string, as the OpenAI API carries it
    id: str = field(default_factory=lambda: "call_" + os.urandom(12).hex())


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split a model's reply into (content, tool calls).

    Calls are `tool_call_block`s; the last may lack its closing tag (the reply ran out of tokens
    right after the JSON). The content is the text before the first block, stripped, or None when
    empty. If any block is not a JSON object with a string `name`, the reply is not treated as a
    tool call at all: the whole text comes back as content and the list is empty.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return text, []
    calls = []
    for match in _TOOL_CALL_BLOCK.finditer(text, start):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", call.get("parameters", {}))
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(ToolCall(name=call["name"], arguments=arguments))
    content = text[:start].strip()
    return (content or None), calls


def tool_calls_as_message(calls: Sequence[ToolCall]) -> Message:
    """The calls as a canonical `function_call` turn, to put back into the history."""
    payload = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.arguments)
        except json.JSONDecodeError:
            arguments = call.arguments
        payload.append({"name": call.name, "arguments": arguments})
    return Message("function_call", json.dumps(payload, ensure_ascii=False))
