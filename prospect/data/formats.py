"""Read dataset files and convert their records into canonical `Example`s, checking every record.

Files
-----
A dataset's `file_name` is a file or a folder. Readable files: `.json` (one JSON list of records;
a `.json` file that actually holds JSON Lines is read as such), `.jsonl` (one record per line,
blank lines ignored), `.parquet` and `.csv` (through pyarrow; a CSV column of true/false becomes
booleans). A folder is read as its files in sorted name order; they must share one extension, and
names starting with "." or "_" (`.DS_Store`, `_SUCCESS`) are ignored. Record indexes are 0-based
and count per file, so `origin` ("path#index") and error messages point at the exact record.

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
- Required columns (alpaca prompt and response, sharegpt messages, trl prompt + completion or
  messages, nemo prompt and response) must be present and not null.

With `on_bad_record="skip"` a bad record (an unreadable JSONL line included) is left out and
reported as a `SkippedRecord`; with "error" (the default) the first one raises UserError. Problems
with a file or an entry as a whole always raise.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field

from prospect.data.example import Example, Message
from prospect.data.registry import DEFAULT_TAGS, DatasetSpec, json_type
from prospect.errors import UserError

READABLE_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
STAGES = ("sft", "kto")
USER_SIDE = ("user", "observation")
MODEL_SIDE = ("assistant", "function_call")


@dataclass
class SkippedRecord:
    """A record left out under `on_bad_record="skip"`: where it is and what was wrong with it."""

    origin: str  # "path#index", like Example.origin
    reason: str  # the full message the record would have raised
    index: int  # 0-based record index in its file
    field: str | None = None  # the offending field, when one is to blame


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


class _RecordError(Exception):
    """A problem with one record; load_examples adds the file and record index to the message."""

    def __init__(self, field_name: str | None, problem: str):
        super().__init__(problem)
        self.field_name = field_name
        self.problem = problem


class _UnreadableLine:
    """Stands in for a JSONL line that is not valid JSON, so it can be skipped like a record."""

    __slots__ = ("lineno", "problem")

    def __init__(self, lineno: int, problem: str):
        self.lineno = lineno
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# Reading files


def _shown(value, limit: int = 60) -> str:
    """A short JSON rendering of a value to quote in an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def data_files(path: str) -> list[str]:
    """The data files behind a dataset path: the file itself, or a folder's files in name order.

    Raises UserError for a missing path, an unreadable extension, an empty folder, a folder with
    subfolders or with files of different extensions.
    """
    if os.path.isfile(path):
        _check_extension(path)
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such file or folder. Check file_name and dataset_dir.")
    files = []
    for name in sorted(os.listdir(path)):
        if name.startswith((".", "_")):  # .DS_Store, _SUCCESS and similar bookkeeping files
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full):
            raise UserError(
                f"{full}: a folder dataset is read one level deep, and this is a subfolder: "
                f"move its files up or name it as its own dataset."
            )
        files.append(full)
    if not files:
        raise UserError(f"{path}: the folder holds no data files.")
    for full in files:
        _check_extension(full)
    extension = _extension(files[0])
    for full in files[1:]:
        if _extension(full) != extension:
            raise UserError(
                f"{path}: a folder dataset needs files of one kind, but it mixes {files[0]} and "
                f"{full}: convert them to one format or move the odd ones out."
            )
    return files


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _check_extension(path: str) -> None:
    extension = _extension(path)
    if extension in READABLE_EXTENSIONS:
        return
    if extension == ".txt":
        raise UserError(
            f"{path}: plain-text files hold pre-training data, and prospect trains sft and kto: "
            f"convert it to .json/.jsonl records with a prompt and a response."
        )
    raise UserError(
        f"{path}: cannot read files of type \"{extension or '(no extension)'}\"; use one of "
        f"{', '.join(READABLE_EXTENSIONS)}."
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
            return handle.read()
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}): save it as UTF-8."
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror}).") from None


def _parse_jsonl(text: str) -> list:
    """Records of a JSON Lines text; a line that is not valid JSON becomes an _UnreadableLine."""
    records: list = []
    loads = json.loads
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(loads(line))
        except json.JSONDecodeError as err:
            records.append(_UnreadableLine(lineno, f"{err.msg} at column {err.colno}"))
    return records


def _read_json(path: str) -> list:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # Many JSON Lines files are named .json (the `datasets` library reads both); a JSON Lines
        # text fails here with "Extra data" right after the first object.
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_jsonl(text)
        raise UserError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}. "
            f"A .json dataset must be one JSON list of records: fix the file there."
        ) from None
    if isinstance(data, dict):
        # One object alone on its line is a one-record JSON Lines file; anything else is not a list.
        if "\n" not in text.strip():
            return [data]
        raise UserError(
            f"{path}: the file holds one JSON object, but a dataset is a JSON list of records "
            f"([{{...}}, {{...}}]) or JSON Lines (one object per line)."
        )
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a JSON list of records, got {json_type(data)}."
        )
    return data


def _read_jsonl(path: str) -> list:
    return _parse_jsonl(_read_text(path))


def _read_parquet(path: str) -> list:
    import pyarrow.parquet as pq  # lazy: keep `import prospect.data.formats` light

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise UserError(f"{path}: cannot read it as Parquet ({err}).") from None


def _read_csv(path: str) -> list:
    import pyarrow.csv as pacsv  # lazy, as above

    try:
        return pacsv.read_csv(path).to_pylist()
    except Exception as err:
        raise UserError(f"{path}: cannot read it as CSV ({err}).") from None


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet,
            ".csv": _read_csv}


def read_records(path: str) -> list:
    """All records of one data file, as Python values (normally dicts), in file order.

    A JSON Lines line that is not valid JSON raises UserError with its line number.
    """
    records = _READERS[_extension(path)](path)
    for index, record in enumerate(records):
        if isinstance(record, _UnreadableLine):
            raise UserError(_unreadable_message(path, index, record))
    return records


def _unreadable_message(path: str, index: int, line: _UnreadableLine) -> str:
    return (
        f"{path}: record {index} (line {line.lineno}): invalid JSON ({line.problem}). Each line "
        f"of a JSON Lines file must be one complete JSON object: fix or remove line {line.lineno}."
    )


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
# Field checks shared by the converters


def _turn_field(column: str, index: int | None, key: str | None) -> str:
    """'conversations[2].value' for a turn of a list; just the column for a plain-string turn."""
    if index is None:
        return column
    return f"{column}[{index}].{key}" if key else f"{column}[{index}]"


def _parse_label(record: dict, key: str | None, stage: str) -> bool | None:
    """The KTO label in `record[key]`: a JSON boolean, required when stage is kto."""
    value = record.get(key) if key else None
    if value is None:
        if stage == "kto":
            raise _RecordError(
                key or "label",
                "missing. Stage kto needs a label on every record: true (desirable) or false "
                "(undesirable).",
            )
        return None
    if value is True or value is False:
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        raise _RecordError(
            key,
            f"expected true or false, got the string {_shown(value)}, which is not a boolean. "
            f"KTO labels are booleans (true = desirable): write {value.strip().lower()} without "
            f"quotes.",
        )
    raise _RecordError(
        key,
        f"expected true or false, got {_shown(value)}. KTO labels are booleans (true = desirable).",
    )


def _parse_preference(record: dict, key: str, stage: str) -> bool | None:
    """NeMo-Aligner's KTO preference: "chosen" -> True, "rejected" -> False."""
    value = record.get(key)
    if value is None:
        if stage == "kto":
            raise _RecordError(
                key, 'missing. Stage kto needs "chosen" (desirable) or "rejected" (undesirable) '
                "on every record.",
            )
        return None
    if value == "chosen":
        return True
    if value == "rejected":
        return False
    raise _RecordError(
        key, f'expected "chosen" or "rejected", got {_shown(value)}. NeMo-Aligner KTO data marks '
        f'a desirable response "chosen" and an undesirable one "rejected".',
    )


def _parse_tools(value, key: str, cache: dict) -> list[dict]:
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
            raise _RecordError(
                key, f"invalid JSON ({err.msg} at column {err.colno}). Tools are a JSON list of "
                f"tool definitions, as a list or a string holding one.",
            ) from None
    if isinstance(value, dict):
        raise _RecordError(
            key, 'expected a JSON list of tool definitions, got a single object: wrap it in [ ].'
        )
    if not isinstance(value, list):
        raise _RecordError(
            key, f"expected a JSON list of tool definitions, got {json_type(value)} "
            f"{_shown(value)}.",
        )
    for position, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _RecordError(
                f"{key}[{position}]", f"expected a tool definition (an object with a \"name\"), "
                f"got {json_type(tool)}.",
            )
    if text is not None:
        cache[text] = value
    return value


def _check_function_call(content: str, field_name: str) -> None:
    """A function_call turn's content must be JSON: {"name", "arguments"} or a list of those."""
    try:
        call = json.loads(content)
    except json.JSONDecodeError as err:
        raise _RecordError(
            field_name, f'a function_call turn must hold a JSON object {{"name": ..., '
            f'"arguments": {{...}}}} (or a JSON list of them); got invalid JSON ({err.msg} at '
            f"column {err.colno}): {_shown(content)}.",
        ) from None
    calls = call if isinstance(call, list) else [call]
    if not calls:
        raise _RecordError(field_name, "a function_call turn holds an empty list of calls.")
    for one in calls:
        if not isinstance(one, dict) or not isinstance(one.get("name"), str) or not one["name"]:
            raise _RecordError(
                field_name, f'each call in a function_call turn needs a "name" (the tool to '
                f'call) and "arguments"; got {_shown(one)}.',
            )


def _order_error(turn: tuple, position: int, step: int) -> _RecordError:
    """The error for a turn whose role breaks the user/assistant alternation."""
    role, _, shown_role, column, index, role_key, _ = turn
    if role == "system":
        wanted = "a system turn may only come first"
    elif step == 0:
        wanted = "the first turn after the system turn must be a user turn"
    elif step % 2 == 0:
        wanted = "a user or observation turn was expected there"
    else:
        wanted = "an assistant or function_call turn was expected there"
    return _RecordError(
        _turn_field(column, index, role_key),
        f"turn {position} has role {_shown(shown_role)} ({role}), but {wanted}. After an "
        f"optional system turn, user/observation turns must alternate with "
        f"assistant/function_call turns, starting with a user turn.",
    )


def _build_conversation(turns: list[tuple], system: str | None, messages_field: str,
                        stage: str) -> list[Message]:
    """Check a conversation and return it as Messages.

    `turns` holds (role, content, shown_role, column, index, role_key, content_key) per turn,
    where role is canonical and shown_role is the value written in the file; fields are named
    lazily from column/index/keys, only when something is wrong. `system` comes from a system
    column and is used when the turns have no system turn of their own.
    """
    messages: list[Message] = []
    first = 0
    if turns and turns[0][0] == "system":
        _, content, _, column, index, _, content_key = turns[0]
        if not isinstance(content, str):
            raise _RecordError(_turn_field(column, index, content_key),
                               f"expected a string, got {json_type(content)}.")
        if content and not content.isspace():
            messages.append(Message("system", content))
        first = 1
    elif system and not system.isspace():
        messages.append(Message("system", system))

    if len(turns) == first:
        raise _RecordError(messages_field, "no user and assistant turns: the conversation is "
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
            raise _order_error(turn, position, step)
        if content.__class__ is not str:
            raise _RecordError(_turn_field(turn[3], turn[4], turn[6]),
                               f"expected a non-empty string, got {json_type(content)} "
                               f"{_shown(content)}.")
        if not content or content.isspace():
            raise _RecordError(_turn_field(turn[3], turn[4], turn[6]),
                               f"empty content in the {role} turn: give it text, or remove the "
                               f"turn or the record.")
        if role == "function_call":
            _check_function_call(content, _turn_field(turn[3], turn[4], turn[6]))
        append(Message(role, content))

    last_role, _, last_shown, column, index, role_key, _ = turns[-1]
    if last_role not in MODEL_SIDE:
        why = ("KTO rates the last assistant turn, so a KTO example must end with one"
               if stage == "kto" else "the conversation must end with the response to train on")
        raise _RecordError(
            _turn_field(column, index, role_key),
            f"the last turn is {_shown(last_shown)} ({last_role}), but {why}: "
            f"end it with an assistant (or function_call) turn.",
        )
    return messages


def _require(record: dict, key: str | None, role: str, layout: Layout):
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
        raise _RecordError(shown_key, f"{state}. {hint}")
    return value


# ----------------------------------------------------------------------------------------------
# Converters: (record) -> (messages, tools, label); errors are _RecordError


def _alpaca_converter(layout: Layout, stage: str):
    tools_cache: dict[str, list] = {}
    cols = layout.columns
    prompt_key, query_key, response_key = cols["prompt"], cols["query"], cols["response"]
    history_key, system_key, tools_key, label_key = (cols["history"], cols["system"],
                                                     cols["tools"], cols["kto_tag"])

    def convert(record: dict):
        instruction = _require(record, prompt_key, "prompt", layout)
        if not isinstance(instruction, str):
            raise _RecordError(prompt_key, f"expected a string, got {json_type(instruction)}.")
        query = record.get(query_key) if query_key else None
        if query is not None and not isinstance(query, str):
            raise _RecordError(query_key, f"expected a string, got {json_type(query)}.")
        user_text = "\n".join(part for part in (instruction, query) if part)
        response = _require(record, response_key, "response", layout)

        turns: list[tuple] = []
        history = record.get(history_key) if history_key else None
        if history is not None:
            if not isinstance(history, list):
                raise _RecordError(history_key, f"expected a list of [instruction, response] "
                                   f"pairs, got {json_type(history)}.")
            for position, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise _RecordError(
                        f"{history_key}[{position}]",
                        f"expected an [instruction, response] pair, got {_shown(pair)}.",
                    )
                turns.append(("user", pair[0], "user", f"{history_key}[{position}]", 0, None, None))
                turns.append(("assistant", pair[1], "assistant", f"{history_key}[{position}]", 1,
                              None, None))
        prompt_field = prompt_key if user_text or not query_key else f"{prompt_key}/{query_key}"
        turns.append(("user", user_text, "user", prompt_field, None, None, None))
        turns.append(("assistant", response, "assistant", response_key, None, None, None))

        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise _RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = _build_conversation(turns, system, prompt_key, stage)
        tools = _parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, _parse_label(record, label_key, stage)

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
    accepted = ", ".join(_shown(name) for name in role_of)

    def convert(record: dict):
        raw_turns = _require(record, messages_key, "messages", layout)
        if not isinstance(raw_turns, list):
            raise _RecordError(messages_key, f"expected a list of turns, got "
                               f"{json_type(raw_turns)}.")
        turns = []
        for index, turn in enumerate(raw_turns):
            if not isinstance(turn, dict):
                raise _RecordError(f"{messages_key}[{index}]", f"expected an object with "
                                   f"\"{role_key}\" and \"{content_key}\", got {json_type(turn)}.")
            shown_role = turn.get(role_key)
            if shown_role is None:
                hint = ""
                if "role" in turn and role_key != "role":
                    hint = (' This turn uses "role"/"content": add "tags": {"role_tag": "role", '
                            '"content_tag": "content"} to the dataset\'s entry.')
                raise _RecordError(f"{messages_key}[{index}].{role_key}", f"missing.{hint}")
            role = role_of.get(shown_role) if isinstance(shown_role, str) else None
            if role is None:
                raise _RecordError(
                    f"{messages_key}[{index}].{role_key}",
                    f"unknown role {_shown(shown_role)}; expected one of {accepted} (set \"tags\" "
                    f"in dataset_info.json if the file uses other names).",
                )
            turns.append((role, turn.get(content_key), shown_role, messages_key, index, role_key,
                          content_key))
        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise _RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = _build_conversation(turns, system, messages_key, stage)
        tools = _parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, _parse_label(record, label_key, stage)

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
        raise _RecordError(field_name, f"expected a non-empty list of tool calls, got "
                           f"{_shown(calls)}.")
    converted = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _RecordError(field_name, f'each tool call needs {{"function": {{"name", '
                               f'"arguments"}}}}; got {_shown(call)}.')
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
        raise _RecordError(column, f"expected a string or a list of {{\"role\", \"content\"}} "
                           f"messages, got {json_type(value)}.")
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise _RecordError(f"{column}[{index}]", f"expected an object with \"role\" and "
                               f"\"content\", got {json_type(message)}.")
        shown_role = message.get("role")
        if shown_role is None:
            raise _RecordError(f"{column}[{index}].role", "missing.")
        role = _MESSAGE_ROLES.get(shown_role) if isinstance(shown_role, str) else None
        if role is None:
            raise _RecordError(
                f"{column}[{index}].role",
                f"unknown role {_shown(shown_role)}; expected one of "
                f"{', '.join(_shown(name) for name in _MESSAGE_ROLES)}.",
            )
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if role == "assistant" and tool_calls:
            if isinstance(content, str) and content.strip():
                raise _RecordError(
                    f"{column}[{index}].content", "an assistant message with both text and "
                    "tool_calls cannot be trained as one turn: drop the text or move it to an "
                    "assistant message of its own.",
                )
            role = "function_call"
            content = _tool_calls_content(tool_calls, f"{column}[{index}].tool_calls")
        turns.append((role, content, shown_role, column, index, "role", "content"))
    return turns


def _trl_converter(layout: Layout, stage: str):
    tools_cache: dict[str, list] = {}
    cols = layout.columns
    prompt_key, completion_key, messages_key = cols["prompt"], cols["response"], cols["messages"]
    label_key, tools_key, system_key = cols["kto_tag"], cols["tools"], cols["system"]

    def convert(record: dict):
        if messages_key and (record.get(messages_key) is not None or not prompt_key):
            value = _require(record, messages_key, "messages", layout)
            if not isinstance(value, list):
                raise _RecordError(messages_key, f"expected a list of {{\"role\", \"content\"}} "
                                   f"messages, got {json_type(value)}.")
            turns = _message_turns(value, messages_key, "user")
            conversation_field = messages_key
        else:
            prompt = _require(record, prompt_key, "prompt", layout)
            completion = _require(record, completion_key, "response", layout)
            turns = (_message_turns(prompt, prompt_key, "user")
                     + _message_turns(completion, completion_key, "assistant"))
            conversation_field = prompt_key
        system = record.get(system_key) if system_key else None
        if system is not None and not isinstance(system, str):
            raise _RecordError(system_key, f"expected a string, got {json_type(system)}.")
        messages = _build_conversation(turns, system, conversation_field, stage)
        tools = _parse_tools(record.get(tools_key), tools_key, tools_cache) if tools_key else []
        return messages, tools, _parse_label(record, label_key, stage)

    return convert


def _nemo_converter(layout: Layout, stage: str):
    cols = layout.columns
    prompt_key, response_key, preference_key = cols["prompt"], cols["response"], cols["kto_tag"]

    def convert(record: dict):
        prompt = _require(record, prompt_key, "prompt", layout)
        response = _require(record, response_key, "response", layout)
        label = _parse_preference(record, preference_key, stage)
        turns = (_message_turns(prompt, prompt_key, "user")
                 + [("assistant", response, "assistant", response_key, None, None, None)])
        return _build_conversation(turns, None, prompt_key, stage), [], label

    return convert


_CONVERTERS = {"alpaca": _alpaca_converter, "sharegpt": _sharegpt_converter,
               "trl": _trl_converter, "nemo": _nemo_converter}


def _check_label_source(spec: DatasetSpec, layout: Layout, stage: str) -> None:
    """Stage kto with an entry that maps no label column cannot work for any record: say so once."""
    if stage == "kto" and not layout.columns.get("kto_tag"):
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
        records = _READERS[_extension(file_path)](file_path)
        total += len(records)
        if convert is None and records:
            first = next((record for record in records if isinstance(record, dict)), None)
            layout = layout_for(spec, first)
            _check_label_source(spec, layout, stage)
            convert = _CONVERTERS[layout.format](layout, stage)
        for index, record in enumerate(records):
            field_name = None
            try:
                if isinstance(record, _UnreadableLine):
                    message = _unreadable_message(file_path, index, record)
                elif not isinstance(record, dict):
                    message = (f"{file_path}: record {index}: expected a JSON object (one record "
                               f"with named fields), got {json_type(record)}.")
                else:
                    messages, tools, label = convert(record)
                    examples.append(Example(messages=messages, tools=tools, label=label,
                                            origin=f"{file_path}#{index}", dataset=spec.name))
                    continue
            except _RecordError as err:
                field_name = err.field_name
                message = f'{file_path}: record {index}: field "{field_name}": {err.problem}'
            if on_bad_record == "error":
                raise UserError(message)
            skipped.append(SkippedRecord(f"{file_path}#{index}", message, index, field_name))
    if total == 0:
        raise UserError(f"{path}: no records ({spec.describe()}). Add data or drop the dataset.")
    return examples, skipped
