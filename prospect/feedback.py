"""Thumbs up / down from a served model's users, kept as a KTO dataset (`prospect serve` with `feedback_dir`).

The server remembers every reply it returns (its id, the conversation that led to it, the reply, the
model or adapter and the sampling settings; the last `MAX_REMEMBERED`). `POST /v1/feedback` with
`{"id": "<completion id>", "label": true | false, "note": "<optional text>"}` appends one record to
`<feedback_dir>/feedback.jsonl`:

    {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": <reply>, "label": true}],
     "tools": [...], "id": ..., "model": ..., "sampling": {...}, "note": ..., "created": <unix time>}

The conversation up to the rated reply, with the rating on that turn: the per-turn label format
(examples/README.md), so a later turn of a conversation is rated as its own turn, with the earlier
turns as its prompt. The folder's `dataset_info.json` gets a `feedback` entry, so
`prospect train` reads the ratings with `dataset_dir: <feedback_dir>` and `dataset: feedback`.

What reaches the file is only what this server generated and remembers, rated once: an unknown id,
a second rating of the same reply, a label that is not a boolean, an oversized note or body, or an
unknown field is a 4xx error that writes nothing. Writers take a lock, so concurrent records never
interleave; each record is one `write` of one line, flushed and fsynced, so a killed server loses
at most the line being written, and the reader skips such a torn last line with a warning
(`prospect.data.files`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prospect.data.example import Message
from prospect.openai_api import ApiError, bad_request

MAX_REMEMBERED = 10_000  # replies that can still be rated (the oldest are forgotten first)
MAX_NOTE_CHARS = 2_000
MAX_BODY_BYTES = 16_384
FEEDBACK_FILE = "feedback.jsonl"
DATASET_NAME = "feedback"
DATASET_ENTRY = {"file_name": FEEDBACK_FILE, "formatting": "sharegpt",
                 "columns": {"messages": "messages", "tools": "tools"},
                 "tags": {"role_tag": "role", "content_tag": "content"}}


@dataclass
class Completion:
    """What the server remembers of one reply."""

    messages: list[Message]  # the request's conversation, then the reply (assistant or function_call)
    tools: list[dict]
    model: str
    sampling: dict


class FeedbackLog:
    """The remembered replies and the feedback file of one server."""

    def __init__(self, folder: str | os.PathLike, capacity: int = MAX_REMEMBERED) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FEEDBACK_FILE
        self.capacity = capacity
        self._completions: OrderedDict[str, Completion] = OrderedDict()
        self._rated: set[str] = set()
        self._lock = threading.Lock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_dataset_info()
        self._drop_torn_line()

    def _drop_torn_line(self) -> None:
        """A server killed mid-write leaves a last line without its newline: cut it off, or the next
        record would be glued to it."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            handle.truncate(data.rfind(b"\n") + 1)
        print(f"warning: {self.path}: the last record was cut off when the server stopped; it was removed.",
              flush=True)

    def _write_dataset_info(self) -> None:
        """Add (or refresh) the `feedback` entry, keeping any other entries of the folder's dataset_info.json."""
        info_path = self.folder / "dataset_info.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        if info.get(DATASET_NAME) == DATASET_ENTRY:
            return
        info[DATASET_NAME] = DATASET_ENTRY
        temporary = info_path.with_name(f".{info_path.name}.tmp")
        temporary.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, info_path)

    def remember(self, completion_id: str, completion: Completion) -> None:
        with self._lock:
            self._completions[completion_id] = completion
            while len(self._completions) > self.capacity:
                forgotten, _ = self._completions.popitem(last=False)
                self._rated.discard(forgotten)

    def record(self, raw: bytes) -> dict:
        """Validate one feedback body and append its record; ApiError (4xx) when it is refused."""
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is {len(raw)} bytes; feedback takes at most {MAX_BODY_BYTES}.",
                           code="request_too_large")
        try:
            body: Any = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"The request body is not valid JSON: {err}.") from None
        if not isinstance(body, dict):
            raise bad_request('The request body must be a JSON object: {"id": ..., "label": true|false}.')
        unknown = sorted(set(body) - {"id", "label", "note"})
        if unknown:
            raise bad_request(f"Unknown field {unknown[0]!r}: feedback takes id, label and note.", unknown[0])
        completion_id, label, note = body.get("id"), body.get("label"), body.get("note")
        if not isinstance(completion_id, str) or not completion_id:
            raise bad_request("'id' is required: the id of a chat completion this server returned.", "id")
        if not isinstance(label, bool):
            raise bad_request(f"'label' must be true (thumbs up) or false (thumbs down), got {json.dumps(label)}.",
                              "label")
        if note is not None and not isinstance(note, str):
            raise bad_request("'note' must be a string.", "note")
        if note is not None and len(note) > MAX_NOTE_CHARS:
            raise bad_request(f"'note' has {len(note)} characters; at most {MAX_NOTE_CHARS}.", "note")
        with self._lock:
            completion = self._completions.get(completion_id)
            if completion is None:
                raise ApiError(404, f"No completion {completion_id!r}: rate a reply this server returned (it "
                               f"remembers the last {self.capacity}).", param="id", code="completion_not_found")
            if completion_id in self._rated:
                raise ApiError(409, f"The completion {completion_id!r} was already rated.", param="id",
                               code="already_rated")
            *history, reply = completion.messages
            if not reply.content.strip():
                raise bad_request("The reply is empty: there is nothing to train on.", "id")
            messages = [{"role": m.role, "content": m.content} for m in history]
            messages.append({"role": reply.role, "content": reply.content, "label": label})
            line = json.dumps({"messages": messages, "tools": completion.tools, "id": completion_id,
                               "model": completion.model, "sampling": completion.sampling, "note": note,
                               "created": int(time.time())}, ensure_ascii=False) + "\n"
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self._rated.add(completion_id)
        return {"id": completion_id, "object": "feedback", "label": label}
