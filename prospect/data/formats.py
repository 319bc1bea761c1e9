"""Convert the records of dataset files into canonical `Example`s, checking every record.

Files are read by `prospect.data.files` (json, jsonl, parquet, csv; a folder of them).

Formats (the entry's `formatting`)
----------------------------------
- `alpaca` (LLaMA-Factory's default): columns `prompt` (default "instruction"), `query`
  ("input"), `response` ("output"), `history` (a list of [instruction, response] pairs), `system`,
  `tools`, `kto_tag`. The user turn is instruction + "\\n" + input, leaving out an empty part, as
  LLaMA-Factory does. As in LLaMA-Factory, once an entry has `columns`, `query` is only read when
  mapped there.
- `sharegpt`: column `messages` (default "conversations") holds a list of turns; `tags` name the
  keys and role values (defaults role_tag "from", content_tag "value", user_tag "human",
  assistant_tag "gpt", observation_tag "observation", function_tag "function_call", system_tag
  "system"). Tags the entry leaves out keep their defaults, and the canonical role names (user,
  assistant, system, function_call, observation) are always accepted too, so `role`/`content` data
  with `user`/`assistant` values needs only role_tag and content_tag. A leading system turn, or
  else the `system` column, is the system message. `tools`, `kto_tag` as for alpaca.
- `trl` (ours): TRL's layouts, either `prompt` + `completion`, each a string or a list of
  {"role", "content"} messages (a prompt string is one user turn, a completion string one
  assistant turn), or a `messages` list; optional `label` (KTO) and `tools`. Message roles are
  system, user, assistant and tool (= observation); an assistant message with `tool_calls` (OpenAI
  style) becomes a function_call turn. `columns` may rename: prompt, response (for "completion"),
  messages, kto_tag (for "label"), tools, system.
- `openai` (newer LLaMA-Factory): a `messages` list of OpenAI chat messages, read like `trl`.
- `nemo` (ours): NeMo-Aligner's KTO JSONL, `prompt` (user text or a message list), `response`
  (assistant text), `preference`: "chosen" (desirable) or "rejected" (undesirable).

Format detection
----------------
When an entry has neither `formatting` nor `columns`, or the dataset was named by its path, the
format comes from the first record's keys: "instruction" -> alpaca; prompt + response + preference
-> nemo; prompt + completion -> trl; "messages" or "conversations" -> sharegpt when its turns use
"from", else trl (role/content messages); anything else -> alpaca (whose missing "instruction"
column is then reported). A detected layout also reads the optional columns "system", "tools",
"history" and "label" (the KTO label) when a record has them; an entry that names its format or
columns reads exactly what it maps, as LLaMA-Factory does.

Checks (each failure names the file, the record and the field, and says how to fix it)
-------------------------------------------------------------------------------------------
(the field checks shared by every format are in `prospect.data.records`)
- Conversation order: an optional system turn first, then user/observation turns alternating
  with assistant/function_call turns, starting with a user turn and ending with an assistant or
  function_call turn (the response that is trained, or rated by KTO). A system turn anywhere else,
  or a role value not in the table, is an error.
- Content: every user/assistant/function_call/observation turn is a non-empty string; an empty
  system message is dropped. A function_call turn holds a JSON object {"name", "arguments"}, or a
  JSON list of them, each with a string "name".
- `tools`: a JSON list of tool definitions (objects), given as a list or as a string holding one.
  Records with the same tools string share one parsed list: treat `Example.tools` as read-only.
- KTO label: a JSON boolean (true = desirable); the strings "true"/"false" and numbers are
  rejected. With stage kto every record needs one, and an entry without a label column is
  rejected as a whole. NeMo's preference must be "chosen" or "rejected".
- Per-turn labels (sharegpt and trl/openai message lists): a turn may carry `"label": true|false`
  beside its role and content, rating that assistant (or function_call) turn. The record's own
  label (kto_tag) rates the last turn and may be left out when a turn has a label; both on the
  last turn must agree. A label on a user turn, or one that is not a boolean, is an error. Stage
  kto trains each rated turn as an example whose prompt is everything before it
  (`Example.rated_turns`).
- Required columns (alpaca prompt and response, sharegpt messages, trl prompt + completion or
  messages, nemo prompt and response) must be present and not null.

With `on_bad_record="skip"` a bad record (an unreadable JSONL line included) is left out and
reported as a `SkippedRecord`; with "error" (the default) the first one raises UserError. Problems
with a file or an entry as a whole always raise.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass

from prospect.data.example import Example
from prospect.data.files import UnreadableLine, data_files, read_file_records, unreadable_message
from prospect.data.records import (
    Layout,
    RecordError,
    build_conversation,
    parse_label,
    parse_preference,
    parse_tools,
    require,
    shown,
)
from prospect.data.registry import DEFAULT_TAGS, DatasetSpec, json_type
from prospect.errors import UserError

STAGES = ("sft", "kto")


@dataclass
class SkippedRecord:
    """A record left out under `on_bad_record="skip"`: where it is and what was wrong with it."""

    origin: str  # "path#index", like Example.origin
    reason: str  # the full message the record would have raised
    index: int  # 0-based record index in its file
    field: str | None = None  # the offending field, when one is to blame


# ----------------------------------------------------------------------------------------------
# Layouts: which format, which columns


def detect_layout(record) -> Layout:
    """The layout a record's keys suggest (see the module docstring for the rules)."""
    keys = record if isinstance(record, dict) else {}
    if "instruction" in keys:
        columns = {"prompt": "instruction", "query": "input", "response": "output",
                   "history": "history", "system": "system", "tools": "tools", "kto_tag": "label"}
        return Layout("alpaca", columns, detected=True)
    if "prompt" in keys and "response" in keys and "preference" in keys:
        return Layout("nemo", {"prompt": "prompt", "response": "response",
                               "kto_tag": "preference"}, detected=True)
    if "prompt" in keys and "completion" in keys:
        return Layout("trl", _trl_columns({}), detected=True)
    for key in ("messages", "conversations"):
        turns = keys.get(key)
        if isinstance(turns, list):
            first_turn = turns[0] if turns else {}
            if isinstance(first_turn, dict) and "from" in first_turn:
                columns = {"messages": key, "system": "system", "tools": "tools",
                           "kto_tag": "label"}
                return Layout("sharegpt", columns, dict(DEFAULT_TAGS), detected=True)
            return Layout("trl", _trl_columns({"messages": key}), detected=True)
    columns = {"prompt": "instruction", "query": "input", "response": "output",
               "history": "history", "system": "system", "tools": "tools", "kto_tag": "label"}
    return Layout("alpaca", columns, detected=True)


def _trl_columns(mapped: dict) -> dict:
    return {
        "prompt": mapped.get("prompt", "prompt"),
        "response": mapped.get("response", "completion"),
        "messages": mapped.get("messages", "messages"),
        "kto_tag": mapped.get("kto_tag", "label"),
        "tools": mapped.get("tools", "tools"),
        "system": mapped.get("system"),
    }


def layout_for(spec: DatasetSpec, first_record) -> Layout:
    """The layout of a dataset: from its entry, or detected from `first_record` (see docstring)."""
    if spec.formatting is None and not spec.has_columns:
        detected = detect_layout(first_record)
        if detected.format != "alpaca" or spec.info_path is None:
            return detected
        # An entry LLaMA-Factory reads as plain alpaca: read exactly its default columns.
        return Layout("alpaca", {"prompt": "instruction", "query": "input", "response": "output",
                                 "history": None, "system": None, "tools": None, "kto_tag": None})
    mapped = spec.columns
    formatting = spec.formatting or "alpaca"
    if formatting == "alpaca":
        return Layout("alpaca", {
            "prompt": mapped.get("prompt", "instruction"),
            # LLaMA-Factory drops the "input" default once `columns` is given.
            "query": mapped.get("query") if spec.has_columns else "input",
            "response": mapped.get("response", "output"),
            "history": mapped.get("history"),
            "system": mapped.get("system"),
            "tools": mapped.get("tools"),
            "kto_tag": mapped.get("kto_tag"),
        })
    if formatting == "sharegpt":
        columns = {"messages": mapped.get("messages", "conversations"),
                   "system": mapped.get("system"), "tools": mapped.get("tools"),
                   "kto_tag": mapped.get("kto_tag")}
        return Layout("sharegpt", columns, {**DEFAULT_TAGS, **spec.tags})
    if formatting == "nemo":
        return Layout("nemo", {"prompt": mapped.get("prompt", "prompt"),
                               "response": mapped.get("response", "response"),
                               "kto_tag": mapped.get("kto_tag", "preference")})
    if formatting == "openai":
        columns = _trl_columns(mapped)
        columns["kto_tag"] = mapped.get("kto_tag")
        columns["tools"] = mapped.get("tools")
        columns["prompt"] = columns["response"] = None  # messages only
        return Layout("trl", columns)
    return Layout("trl", _trl_columns(mapped))


# ----------------------------------------------------------------------------------------------
# Converters: (record) -> (messages, tools, label); errors are RecordError


def _alpaca_converter(layout: Layout, stage: str):
    tools_cache: dict[str, list] = {}
    cols = layout.columns
    prompt_key, query_key, response_key = cols["prompt"], cols["query"], cols["response"]
    history_key, system_key, tools_key, label_key = (cols["history"], cols["system"],
                                                     cols["tools"], cols["kto_tag"])

    def convert(record: dict):
        instruction = require(record, prompt_key, "prompt", layout)
        if not isinstance(instruction, str):
            raise RecordError(prompt_key, f"expected a string, got {json_type(instruction)}.")
        query = record.get(query_key) if query_key else None
        if query is not None and not isinstance(query, str):
            raise RecordError(query_key, f"expected a string, got {json_type(query)}.")
        user_text = "\n".join(part for part in (instruction, query) if part)
        response = require(record, response_key, "response", layout)

        turns: list[tuple] = []
        history = record.get(history_key) if history_key else None
        if history is not None:
            if not isinstance(history, list):
                raise RecordError(history_key, f"expected a list of [instruction, response] "
                                   f"pairs, got {json_type(history)}.")
            for position, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise RecordError(
                        f"{history_key}[{position}]",
                        f"expected an [instruction, response] pair, got {shown(pair)}.",
                    )
                turns.append(("user", pair[0], "user", f"{history_key}[{position}]", 0, None, None))
                turns.append(("assistant", pair[1], "assistant", f"{history_key}[{position}]", 1,
                              None, None))
        prompt_field = prompt_key if user_text or not query_key else f"{prompt_key}/{query_key}"
        turns.append(("user", user_text, "user", prompt_field, None, None, None))
        turns.append(("assistant", response, "assistant", response_key, None, None, None))

        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = build_conversation(turns, system, prompt_key, stage)
        tools = parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, parse_label(record, label_key, stage)

    return convert


def _sharegpt_converter(layout: Layout, stage: str):
    tools_cache: dict[str, list] = {}
    cols, tags = layout.columns, layout.tags
    messages_key, system_key, tools_key, label_key = (cols["messages"], cols["system"],
                                                      cols["tools"], cols["kto_tag"])
    role_key, content_key = tags["role_tag"], tags["content_tag"]
    # Canonical names first, so that the entry's own tags win where a value is both.
    role_of = {role: role for role in ("system", "user", "assistant", "function_call",
                                       "observation")}
    role_of.update({DEFAULT_TAGS[tag]: role for tag, role in _TAG_ROLES.items()})
    role_of.update({tags[tag]: role for tag, role in _TAG_ROLES.items()})
    accepted = ", ".join(shown(name) for name in role_of)

    def convert(record: dict):
        raw_turns = require(record, messages_key, "messages", layout)
        if not isinstance(raw_turns, list):
            raise RecordError(messages_key, f"expected a list of turns, got "
                               f"{json_type(raw_turns)}.")
        turns = []
        for index, turn in enumerate(raw_turns):
            if not isinstance(turn, dict):
                raise RecordError(f"{messages_key}[{index}]", f"expected an object with "
                                   f"\"{role_key}\" and \"{content_key}\", got {json_type(turn)}.")
            shown_role = turn.get(role_key)
            if shown_role is None:
                hint = ""
                if "role" in turn and role_key != "role":
                    hint = (' This turn uses "role"/"content": add "tags": {"role_tag": "role", '
                            '"content_tag": "content"} to the dataset\'s entry.')
                raise RecordError(f"{messages_key}[{index}].{role_key}", f"missing.{hint}")
            role = role_of.get(shown_role) if isinstance(shown_role, str) else None
            if role is None:
                raise RecordError(
                    f"{messages_key}[{index}].{role_key}",
                    f"unknown role {shown(shown_role)}; expected one of {accepted} (set \"tags\" "
                    f"in dataset_info.json if the file uses other names).",
                )
            turns.append((role, turn.get(content_key), shown_role, messages_key, index, role_key,
                          content_key, turn.get("label"), "label"))
        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = build_conversation(turns, system, messages_key, stage)
        tools = parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, parse_label(record, label_key, stage, messages)

    return convert


_TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}

# Role values of TRL / OpenAI message lists; "tool" is OpenAI's name for a tool's answer.
_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant",
                  "tool": "observation", "function_call": "function_call",
                  "observation": "observation"}


def _tool_calls_content(calls, field_name: str) -> str:
    """OpenAI `tool_calls` as canonical function_call content: {"name", "arguments"} or a list."""
    if not isinstance(calls, list) or not calls:
        raise RecordError(field_name, f"expected a non-empty list of tool calls, got "
                           f"{shown(calls)}.")
    converted = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(field_name, f'each tool call needs {{"function": {{"name", '
                               f'"arguments"}}}}; got {shown(call)}.')
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        converted.append({"name": function["name"], "arguments": arguments})
    return json.dumps(converted[0] if len(converted) == 1 else converted, ensure_ascii=False)


def _message_turns(value, column: str, default_role: str) -> list[tuple]:
    """Turns from a TRL/OpenAI value: a plain string (one `default_role` turn) or a message list."""
    if isinstance(value, str):
        return [(default_role, value, default_role, column, None, None, None)]
    if not isinstance(value, list):
        raise RecordError(column, f"expected a string or a list of {{\"role\", \"content\"}} "
                           f"messages, got {json_type(value)}.")
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordError(f"{column}[{index}]", f"expected an object with \"role\" and "
                               f"\"content\", got {json_type(message)}.")
        shown_role = message.get("role")
        if shown_role is None:
            raise RecordError(f"{column}[{index}].role", "missing.")
        role = _MESSAGE_ROLES.get(shown_role) if isinstance(shown_role, str) else None
        if role is None:
            raise RecordError(
                f"{column}[{index}].role",
                f"unknown role {shown(shown_role)}; expected one of "
                f"{', '.join(shown(name) for name in _MESSAGE_ROLES)}.",
            )
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls:
            if isinstance(content, str) and content.strip():
                raise RecordError(
                    f"{column}[{index}].content", "an assistant message with both text and "
                    "tool_calls cannot be trained as one turn: drop the text or move it to an "
                    "assistant message of its own.",
                )
            role = "function_call"
            content = _tool_calls_content(tool_calls, f"{column}[{index}].tool_calls")
        turns.append((role, content, shown_role, column, index, "role", "content", message.get("label"), "label"))
    return turns


def _trl_converter(layout: Layout, stage: str):
    tools_cache: dict[str, list] = {}
    cols = layout.columns
    prompt_key, completion_key, messages_key = cols["prompt"], cols["response"], cols["messages"]
    label_key, tools_key, system_key = cols["kto_tag"], cols["tools"], cols["system"]

    def convert(record: dict):
        if messages_key and (record.get(messages_key) is not None or not prompt_key):
            value = require(record, messages_key, "messages", layout)
            if not isinstance(value, list):
                raise RecordError(messages_key, f"expected a list of {{\"role\", \"content\"}} "
                                   f"messages, got {json_type(value)}.")
            turns = _message_turns(value, messages_key, "user")
            conversation_field = messages_key
        else:
            prompt = require(record, prompt_key, "prompt", layout)
            completion = require(record, completion_key, "response", layout)
            turns = (_message_turns(prompt, prompt_key, "user")
                     + _message_turns(completion, completion_key, "assistant"))
            conversation_field = prompt_key
        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = build_conversation(turns, system, conversation_field, stage)
        tools = parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, parse_label(record, label_key, stage, messages)

    return convert


def _nemo_converter(layout: Layout, stage: str):
    cols = layout.columns
    prompt_key, response_key, preference_key = cols["prompt"], cols["response"], cols["kto_tag"]

    def convert(record: dict):
        prompt = require(record, prompt_key, "prompt", layout)
        response = require(record, response_key, "response", layout)
        label = parse_preference(record, preference_key, stage)
        turns = (_message_turns(prompt, prompt_key, "user")
                 + [("assistant", response, "assistant", response_key, None, None, None)])
        return build_conversation(turns, None, prompt_key, stage), [], label

    return convert


_CONVERTERS = {"alpaca": _alpaca_converter, "sharegpt": _sharegpt_converter,
               "trl": _trl_converter, "nemo": _nemo_converter}


def _check_label_source(spec: DatasetSpec, layout: Layout, stage: str) -> None:
    """Stage kto with an entry that maps no label column cannot work for any record: say so once."""
    if stage == "kto" and not layout.columns.get("kto_tag") and layout.format not in ("sharegpt", "trl"):
        raise UserError(
            f'{spec.describe()}: stage kto needs a boolean label on every record, and this '
            f'{layout.format} entry maps none: add "kto_tag": "<field holding true/false>" under '
            f'"columns" in dataset_info.json.'
        )


# ----------------------------------------------------------------------------------------------
# Entry point


def load_examples(spec: DatasetSpec, dataset_dir: str, *, stage: str,
                  on_bad_record: str = "error") -> tuple[list[Example], list[SkippedRecord]]:
    """Read and convert every record of one dataset.

    `stage` is "sft" or "kto" (kto requires a label on every record). With `on_bad_record`
    "error" the first bad record raises UserError; with "skip" bad records are left out and
    returned as SkippedRecords. Examples get origin "path#index" and dataset `spec.name`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if on_bad_record not in ("error", "skip"):
        raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
    path = spec.data_path(dataset_dir)
    if path is None:
        raise UserError(
            f'{spec.describe()}: has no "file_name", so there is no local data to read.'
        )

    # Loading allocates millions of small objects and no reference cycles; left on, the cyclic
    # garbage collector rescans the growing heap and more than doubles the load time.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_files(spec, path, stage, on_bad_record)
    finally:
        if gc_was_enabled:
            gc.enable()


def _load_files(spec: DatasetSpec, path: str, stage: str,
                on_bad_record: str) -> tuple[list[Example], list[SkippedRecord]]:
    """load_examples' work: read each file of the dataset and convert its records."""
    examples: list[Example] = []
    skipped: list[SkippedRecord] = []
    convert = None
    total = 0
    for file_path in data_files(path):
        records = read_file_records(file_path)
        total += len(records)
        if convert is None and records:
            first = next((record for record in records if isinstance(record, dict)), None)
            layout = layout_for(spec, first)
            _check_label_source(spec, layout, stage)
            convert = _CONVERTERS[layout.format](layout, stage)
        for index, record in enumerate(records):
            field_name = None
            try:
                if isinstance(record, UnreadableLine):
                    message = unreadable_message(file_path, index, record)
                elif not isinstance(record, dict):
                    message = (f"{file_path}: record {index}: expected a JSON object (one record "
                               f"with named fields), got {json_type(record)}.")
                else:
                    messages, tools, label = convert(record)
                    examples.append(Example(messages=messages, tools=tools, label=label,
                                            origin=f"{file_path}#{index}", dataset=spec.name))
                    continue
            except RecordError as err:
                field_name = err.field_name
                message = f'{file_path}: record {index}: field "{field_name}": {err.problem}'
            if on_bad_record == "error":
                raise UserError(message)
            skipped.append(SkippedRecord(f"{file_path}#{index}", message, index, field_name))
    if total == 0:
        raise UserError(f"{path}: no records ({spec.describe()}). Add data or drop the dataset.")
    return examples, skipped
