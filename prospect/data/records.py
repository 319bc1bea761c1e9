"""One record's fields, checked: the layout a dataset is read with, and the parsing of turns, labels
and tools that every format's converter shares (`prospect.data.formats`). Each problem is a
`RecordError` naming the field; `load_examples` adds the file and the record index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from prospect.data.example import Message
from prospect.data.registry import json_type

USER_SIDE = ("user", "observation")
MODEL_SIDE = ("assistant", "function_call")


@dataclass
class Layout:
    """How to read one dataset's records: its format and the record keys of each column role.

    A column role mapped to None is not read. `tags` are the ShareGPT tag names (sharegpt only).
    `detected` says the format came from the first record rather than from the entry.
    """

    format: str
    columns: dict[str, str | None]
    tags: dict[str, str] = field(default_factory=dict)
    detected: bool = False


class RecordError(Exception):
    """A problem with one record; load_examples adds the file and record index to the message."""

    def __init__(self, field_name: str | None, problem: str):
        super().__init__(problem)
        self.field_name = field_name
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# Quoting values


def shown(value, limit: int = 60) -> str:
    """A short JSON rendering of a value to quote in an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Field checks shared by the converters


def turn_field(column: str, index: int | None, key: str | None) -> str:
    """'conversations[2].value' for a turn of a list; just the column for a plain-string turn."""
    if index is None:
        return column
    return f"{column}[{index}].{key}" if key else f"{column}[{index}]"


def parse_label(record: dict, key: str | None, stage: str, messages: list[Message] = ()) -> bool | None:
    """The KTO label in `record[key]`: a JSON boolean, which rates the last turn. Stage kto needs
    it unless a turn of `messages` carries a label of its own; the two may not disagree."""
    value = record.get(key) if key else None
    if value is None:
        if stage == "kto" and not any(m.label is not None for m in messages):
            raise RecordError(
                key or "label",
                "missing. Stage kto needs a label on every record: true (desirable) or false "
                "(undesirable), or a \"label\" on the assistant turns that were rated.",
            )
        return None
    if value is True or value is False:
        if messages and messages[-1].label not in (None, value):
            raise RecordError(key, f"{shown(value)} rates the last turn, which has its own label "
                                   f"{shown(messages[-1].label)}: keep one of them.")
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        raise RecordError(
            key,
            f"expected true or false, got the string {shown(value)}, which is not a boolean. "
            f"KTO labels are booleans (true = desirable): write {value.strip().lower()} without "
            f"quotes.",
        )
    raise RecordError(
        key,
        f"expected true or false, got {shown(value)}. KTO labels are booleans (true = desirable).",
    )


def parse_preference(record: dict, key: str, stage: str) -> bool | None:
    """NeMo-Aligner's KTO preference: "chosen" -> True, "rejected" -> False."""
    value = record.get(key)
    if value is None:
        if stage == "kto":
            raise RecordError(
                key, 'missing. Stage kto needs "chosen" (desirable) or "rejected" (undesirable) '
                "on every record.",
            )
        return None
    if value == "chosen":
        return True
    if value == "rejected":
        return False
    raise RecordError(
        key, f'expected "chosen" or "rejected", got {shown(value)}. NeMo-Aligner KTO data marks '
        f'a desirable response "chosen" and an undesirable one "rejected".',
    )


def parse_tools(value, key: str, cache: dict) -> list[dict]:
    """Tool definitions: a JSON list of objects, given as a list or as a string that holds one.

    `cache` maps tool strings already parsed in this dataset to their lists: many records offer
    the same tools, and parsing them once per record was a third of the load time. Examples
    with the same tools string therefore share one (read-only) list.
    """
    if value is None or value == "":
        return []
    text = None
    if isinstance(value, str):
        cached = cache.get(value)
        if cached is not None:
            return cached
        text = value
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RecordError(
                key, f"invalid JSON ({err.msg} at column {err.colno}). Tools are a JSON list of "
                f"tool definitions, as a list or a string holding one.",
            ) from None
    if isinstance(value, dict):
        raise RecordError(
            key, 'expected a JSON list of tool definitions, got a single object: wrap it in [ ].'
        )
    if not isinstance(value, list):
        raise RecordError(
            key, f"expected a JSON list of tool definitions, got {json_type(value)} "
            f"{shown(value)}.",
        )
    for position, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise RecordError(
                f"{key}[{position}]", f"expected a tool definition (an object with a \"name\"), "
                f"got {json_type(tool)}.",
            )
    if text is not None:
        cache[text] = value
    return value


def check_function_call(content: str, field_name: str) -> None:
    """A function_call turn's content must be JSON: {"name", "arguments"} or a list of those."""
    try:
        call = json.loads(content)
    except json.JSONDecodeError as err:
        raise RecordError(
            field_name, f'a function_call turn must hold a JSON object {{"name": ..., '
            f'"arguments": {{...}}}} (or a JSON list of them); got invalid JSON ({err.msg} at '
            f"column {err.colno}): {shown(content)}.",
        ) from None
    calls = call if isinstance(call, list) else [call]
    if not calls:
        raise RecordError(field_name, "a function_call turn holds an empty list of calls.")
    for one in calls:
        if not isinstance(one, dict) or not isinstance(one.get("name"), str) or not one["name"]:
            raise RecordError(
                field_name, f'each call in a function_call turn needs a "name" (the tool to '
                f'call) and "arguments"; got {shown(one)}.',
            )


def order_error(turn: tuple, position: int, step: int) -> RecordError:
    """The error for a turn whose role breaks the user/assistant alternation."""
    role, _, shown_role, column, index, role_key, *_ = turn
    if role == "system":
        wanted = "a system turn may only come first"
    elif step == 0:
        wanted = "the first turn after the system turn must be a user turn"
    elif step % 2 == 0:
        wanted = "a user or observation turn was expected there"
    else:
        wanted = "an assistant or function_call turn was expected there"
    return RecordError(
        turn_field(column, index, role_key),
        f"turn {position} has role {shown(shown_role)} ({role}), but {wanted}. After an "
        f"optional system turn, user/observation turns must alternate with "
        f"assistant/function_call turns, starting with a user turn.",
    )


def turn_label(value, field_name: str, role: str) -> bool:
    """A turn's own rating: a JSON boolean on an assistant (or function_call) turn."""
    if value is not True and value is not False:
        raise RecordError(field_name, f"expected true or false, got {shown(value)}. A turn's label is a "
                                      "boolean (true = thumbs up).")
    if role not in MODEL_SIDE:
        raise RecordError(field_name, f"a label rates a reply, but this is a {role} turn: put it on the "
                                      "assistant turn that was rated.")
    return value


def build_conversation(turns: list[tuple], system: str | None, messages_field: str,
                        stage: str) -> list[Message]:
    """Check a conversation and return it as Messages.

    `turns` holds (role, content, shown_role, column, index, role_key, content_key) per turn,
    where role is canonical and shown_role is the value written in the file; fields are named
    lazily from column/index/keys, only when something is wrong. A turn may carry two more items,
    (label, label_key): its own rating. `system` comes from a system column and is used when the
    turns have no system turn of their own.
    """
    messages: list[Message] = []
    first = 0
    if turns and turns[0][0] == "system":
        _, content, _, column, index, _, content_key, *_ = turns[0]
        if not isinstance(content, str):
            raise RecordError(turn_field(column, index, content_key),
                               f"expected a string, got {json_type(content)}.")
        if content and not content.isspace():
            messages.append(Message("system", content))
        first = 1
    elif system and not system.isspace():
        messages.append(Message("system", system))

    if len(turns) == first:
        raise RecordError(messages_field, "no user and assistant turns: the conversation is "
                           "empty. Give it a user turn and an assistant turn, or remove the "
                           "record.")

    append = messages.append
    for position in range(first, len(turns)):
        turn = turns[position]
        role, content = turn[0], turn[1]
        step = position - first
        # The hot loop of loading: plain comparisons, and messages built only on failure.
        if step & 1:
            in_order = role == "assistant" or role == "function_call"
        elif step:
            in_order = role == "user" or role == "observation"
        else:
            in_order = role == "user"
        if not in_order:
            raise order_error(turn, position, step)
        if content.__class__ is not str:
            raise RecordError(turn_field(turn[3], turn[4], turn[6]),
                               f"expected a non-empty string, got {json_type(content)} "
                               f"{shown(content)}.")
        if not content or content.isspace():
            raise RecordError(turn_field(turn[3], turn[4], turn[6]),
                               f"empty content in the {role} turn: give it text, or remove the "
                               f"turn or the record.")
        if role == "function_call":
            check_function_call(content, turn_field(turn[3], turn[4], turn[6]))
        if len(turn) > 7 and turn[7] is not None:
            append(Message(role, content, turn_label(turn[7], turn_field(turn[3], turn[4], turn[8]), role)))
            continue
        append(Message(role, content))

    last_role, _, last_shown, column, index, role_key, *_ = turns[-1]
    if last_role not in MODEL_SIDE:
        why = ("KTO rates the last assistant turn, so a KTO example must end with one"
               if stage == "kto" else "the conversation must end with the response to train on")
        raise RecordError(
            turn_field(column, index, role_key),
            f"the last turn is {shown(last_shown)} ({last_role}), but {why}: "
            f"end it with an assistant (or function_call) turn.",
        )
    return messages


def require(record: dict, key: str | None, role: str, layout: Layout):
    """record[key] for a required column; a clear error when the column is missing or null."""
    value = record.get(key) if key else None
    if value is None:
        shown_key = key or role
        if layout.detected:
            hint = (f"The format was detected as {layout.format} from the first record's keys; "
                    f"if that is wrong, set \"formatting\" (alpaca, sharegpt, trl, nemo) and "
                    f"\"columns\" for this dataset in dataset_info.json.")
        else:
            hint = (f"It is the {layout.format} {role} column: add it to the record, or map "
                    f"\"{role}\" under \"columns\" in dataset_info.json to the field that "
                    f"holds it.")
        state = "null" if key in record else "missing"
        raise RecordError(shown_key, f"{state}. {hint}")
    return value
