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


@dataclass
class Example:
    """One conversation: an optional leading system message, then user/assistant turns.

    `tools` is the parsed JSON list of tool (function) definitions offered to the model, or empty.
    `label` is the KTO label: True = desirable (thumbs up), False = undesirable, None = no label.
    `origin` is "file#index", used in error messages and reports.
    """

    messages: list[Message]
    tools: list[dict] = field(default_factory=list)
    label: bool | None = None
    origin: str = ""
    dataset: str = ""  # name of the dataset_info.json entry it came from

    def to_json(self) -> str:
        return json.dumps(
            {
                "messages": [[m.role, m.content] for m in self.messages],
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
            messages=[Message(role, content) for role, content in d["messages"]],
            tools=d["tools"],
            label=d["label"],
            origin=d["origin"],
            dataset=d["dataset"],
        )
