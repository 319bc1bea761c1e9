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
