"""The canonical example every dataset format is converted into."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Roles of the canonical conversation. `function_call` is an assistant turn whose content is a JSON
# tool call (an object {"name", "arguments"} or a list of them); `observation` is the tool's answer.
ROLES = ("system", "user", "assistant", "function_call", "observation")
TRAINED_ROLES = ("assistant", "function_call")


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    label: bool | None = None  # a thumbs up (True) / down (False) on this assistant turn, if it was rated


@dataclass
class Example:
    """One conversation: an optional leading system message, then user/assistant turns.

    `tools` is the parsed JSON list of tool (function) definitions offered to the model, or empty.
    `label` is the KTO label of the last turn: True = desirable (thumbs up), False = undesirable,
    None = no label; a turn's own `Message.label` rates that turn (`rated_turns`). `origin` is
    "file#index" ("file#index turn i" for one rated turn of it), used in errors and reports.
    """

    messages: list[Message]
    tools: list[dict] = field(default_factory=list)
    label: bool | None = None
    origin: str = ""
    dataset: str = ""  # name of the dataset_info.json entry it came from

    def to_json(self) -> str:
        return json.dumps(
            {
                "messages": [[m.role, m.content] if m.label is None else [m.role, m.content, m.label]
                             for m in self.messages],
                "tools": self.tools,
                "label": self.label,
                "origin": self.origin,
                "dataset": self.dataset,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> "Example":
        d = json.loads(text)
        return cls(
            messages=[Message(*fields) for fields in d["messages"]],
            tools=d["tools"],
            label=d["label"],
            origin=d["origin"],
            dataset=d["dataset"],
        )

    def rated_turns(self) -> list["Example"]:
        """KTO's examples of this conversation: one per rated turn, the conversation up to that turn
        with the turn's label (the record's own `label` rates the last turn). Unrated: [self]."""
        labels = {i: m.label for i, m in enumerate(self.messages) if m.label is not None}
        if not labels:
            return [self]
        if self.label is not None:
            labels[len(self.messages) - 1] = self.label  # equal to the turn's own, when both are given
        return [
            Example([Message(m.role, m.content) for m in self.messages[: i + 1]], self.tools, label,
                    f"{self.origin} turn {i}", self.dataset)
            for i, label in sorted(labels.items())
        ]


def conversation_of(origin: str) -> str:
    """The record a rated turn's example comes from: "file#i" of "file#i turn k"."""
    record, _, turn = origin.rpartition(" turn ")
    return record if record and turn.isdigit() else origin


def fold_conversations(examples: list[Example]) -> tuple[list[Example], int]:
    """KTO records that rate a turn of another record's conversation, folded into that record as the
    turn's label. Returns (the examples left, how many were folded).

    A record whose tools and messages are the start of a longer record's, up to its rated last turn,
    is that conversation rated at that turn: `prospect serve` writes feedback so, one record per rated
    reply. Folded, the conversation's rated turns are one record, trained in one forward pass (its
    examples are the same: `rated_turns`). A turn the longer record already rates (a second rating of
    the same reply) stays a record of its own, as does a record that rates more than its last turn."""
    import hashlib

    def prefix_digests(example: Example):  # (message index, digest of tools + messages up to it), assistant turns
        h = hashlib.sha256(json.dumps(example.tools, sort_keys=True).encode())
        for i, m in enumerate(example.messages):
            h.update(json.dumps([m.role, m.content]).encode())
            if m.role == "assistant":
                yield i, h.copy().digest()

    digests = [dict(prefix_digests(e)) for e in examples]
    rated = [any(m.label is not None for m in e.messages) or e.label is not None for e in examples]
    longest: dict[bytes, int] = {}  # digest of a conversation's start -> the longest rated record with it
    for k in sorted(range(len(examples)), key=lambda k: -len(examples[k].messages)):
        if rated[k]:
            for digest in digests[k].values():
                longest.setdefault(digest, k)
    folded: set[int] = set()
    for k, example in enumerate(examples):
        if not example.messages:
            continue
        last = len(example.messages) - 1
        label = example.messages[last].label if example.label is None else example.label
        if label is None or any(m.label is not None for m in example.messages[:last]):
            continue
        host = longest.get(digests[k].get(last))
        if host is None or host == k or host in folded or len(examples[host].messages) <= last + 1:
            continue
        turn = examples[host].messages[last]
        if turn.label is not None:
            continue
        examples[host].messages[last] = Message(turn.role, turn.content, label)
        folded.add(k)
    return [e for k, e in enumerate(examples) if k not in folded], len(folded)
