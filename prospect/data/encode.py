"""Encode one canonical example into token ids and labels (the loss mask) for SFT or KTO.

The rendered conversation is tokenized once, as a whole, exactly as
`tokenizer.apply_chat_template(tokenize=True)` does; a token is trained iff its first character
lies in a trained span of the template. Tokenizing turns separately and concatenating would be
simpler, but BPE merges across a boundary (e.g. a header's "\\n" and a content starting with "\\n")
would then give ids the model never sees at inference.

Labels are aligned with input_ids (labels[t] is the target for position t; the loss shifts them),
and -100 marks a position without loss.

Everything here is plain module-level functions and dataclasses, so `datasets.map(num_proc=N)`
can pickle it (the template and tokenizer are passed in, e.g. through `functools.partial`).
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from prospect.data.example import Example
from prospect.data.templates import Template, TrainedSpan
from prospect.errors import UserError

IGNORE_INDEX = -100
STAGES = ("sft", "kto")


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one example.

    `prompt_len`: KTO, the number of prompt tokens (the completion is input_ids[prompt_len:]);
    SFT, the index of the first trained token. `label` is the KTO label (None for SFT).
    `num_tokens_before_cutoff` is the length before truncation to cutoff_len.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    label: bool | None
    num_tokens_before_cutoff: int

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class DropReason(str, enum.Enum):
    NO_TRAINED_TURN = "no assistant or function_call turn to train on"
    NO_TRAINED_TOKEN_WITHIN_CUTOFF = "no trained token within cutoff_len"


@dataclass(frozen=True)
class DroppedExample:
    """An example left out of training, and why (reported by `prospect data check`, never raised)."""

    reason: DropReason
    origin: str
    num_tokens_before_cutoff: int


def encode_example(
    example: Example,
    template: Template,
    tokenizer,
    *,
    stage: str,
    cutoff_len: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> EncodedExample | DroppedExample:
    """Render, tokenize and mask one example.

    SFT: loss on every assistant and function_call turn (content + end-of-turn token);
    `train_on_prompt` puts the loss on every token, `mask_history` only on the last trained turn.
    KTO: the completion is the final assistant turn, the prompt everything before it including the
    assistant header; only the completion carries loss (`train_on_prompt`/`mask_history` do not
    apply) and the text ends right after the completion's end-of-turn token.

    cutoff_len keeps the first cutoff_len tokens: the prompt conditions everything after it, so
    cutting its start would train on answers to questions the model cannot see; an example left with
    no trained token is returned as a `DroppedExample` rather than raised.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if cutoff_len < 1:
        raise UserError(f"cutoff_len must be a positive number of tokens, got {cutoff_len}")
    rendered = template.render(example.messages, example.tools, origin=example.origin)
    text = rendered.text

    if stage == "kto":
        completion = _kto_completion_span(example, rendered.trained_spans)
        text = text[: completion.end]
        trained_ranges = [(completion.start, completion.end)]
    elif train_on_prompt:
        trained_ranges = [(0, len(text))]
    elif not rendered.trained_spans:
        return DroppedExample(DropReason.NO_TRAINED_TURN, example.origin, 0)
    elif mask_history:
        last = rendered.trained_spans[-1]
        trained_ranges = [(last.start, last.end)]
    else:
        trained_ranges = [(span.start, span.end) for span in rendered.trained_spans]

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    token_starts = [start for start, _ in encoding["offset_mapping"]]
    trained = _tokens_starting_in(token_starts, trained_ranges)
    labels = [token if is_trained else IGNORE_INDEX for token, is_trained in zip(input_ids, trained)]

    num_tokens = len(input_ids)
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        return DroppedExample(DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF, example.origin, num_tokens)

    if stage == "kto":
        prompt_len = bisect.bisect_left(token_starts, trained_ranges[0][0])  # tokens starting before the completion
    else:
        prompt_len = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return EncodedExample(input_ids, labels, prompt_len, example.label if stage == "kto" else None, num_tokens)


def _kto_completion_span(example: Example, spans: Sequence[TrainedSpan]) -> TrainedSpan:
    """The span of the final assistant turn, after checking the example is a valid KTO example."""
    where = example.origin or "a KTO example"
    if example.label is None:
        raise UserError(
            f"{where}: a KTO example needs a label (desirable true/false); set the kto_tag column "
            "(or `label` / `preference`) for every record"
        )
    last_index = len(example.messages) - 1
    if last_index < 0 or example.messages[last_index].role != "assistant":
        last_role = example.messages[last_index].role if last_index >= 0 else "nothing"
        raise UserError(
            f"{where}: a KTO example must end with an assistant turn (the completion being rated), "
            f"but it ends with {last_role}; put the rated answer last"
        )
    if not spans or spans[-1].message_index != last_index:
        raise UserError(f"{where}: the template did not mark the final assistant turn; use another template")
    return spans[-1]


def _tokens_starting_in(token_starts: Sequence[int], ranges: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token, whether its start offset lies in one of the sorted, disjoint [start, end) ranges."""
    range_starts = [start for start, _ in ranges]
    flags = []
    for position in token_starts:
        k = bisect.bisect_right(range_starts, position) - 1
        flags.append(k >= 0 and position < ranges[k][1])
    return flags
