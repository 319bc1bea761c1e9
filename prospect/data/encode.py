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

from prospect.data.example import Example, Message
from prospect.data.templates import Template, TrainedSpan
from prospect.errors import UserError

IGNORE_INDEX = -100
STAGES = ("sft", "kto")


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one example.

    `prompt_len`: KTO, the number of prompt tokens (the completion is input_ids[prompt_len:]);
    SFT, the index of the first trained token. `label` is the KTO label (None for SFT).
    `num_tokens_before_cutoff` is the length before truncation to cutoff_len; `prompt_tokens_cut` and
    `completion_tokens_cut` (KTO) say how many tokens of each part truncation removed.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    label: bool | None
    num_tokens_before_cutoff: int
    prompt_tokens_cut: int = 0
    completion_tokens_cut: int = 0

    @property
    def num_trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    @property
    def num_trained_targets(self) -> int:
        """Tokens that carry loss: trained tokens with a token before them to predict them from."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


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
    truncation_mode: str = "keep_end",
) -> EncodedExample | DroppedExample:
    """Render, tokenize and mask one example.

    SFT: loss on every assistant and function_call turn (content + end-of-turn token);
    `train_on_prompt` puts the loss on every token, `mask_history` only on the last trained turn.
    SFT keeps the first cutoff_len tokens: the turns it trains on condition on everything before them,
    so cutting the start would train on answers to questions the model cannot see. An example left
    with no trained token is returned as a `DroppedExample` rather than raised.

    KTO: the completion is the final assistant turn, the prompt everything before it including the
    assistant header; only the completion carries loss (`train_on_prompt`/`mask_history` do not
    apply) and the text ends right after the completion's end-of-turn token. Truncation is
    `truncate_kto`'s (`truncation_mode`: keep_end by default, which drops no example).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if cutoff_len < 1:
        raise UserError(f"cutoff_len must be a positive number of tokens, got {cutoff_len}")
    if stage == "kto":
        return truncate_kto(example, template, tokenizer, cutoff_len=cutoff_len, truncation_mode=truncation_mode)
    rendered = template.render(example.messages, example.tools, origin=example.origin)
    text = rendered.text
    if train_on_prompt:
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
    # labels[0] is never a target (no token before it predicts it): an example needs a trained token after it
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return DroppedExample(DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF, example.origin, num_tokens)
    prompt_len = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return EncodedExample(input_ids, labels, prompt_len, None, num_tokens)


# --------------------------------------------------------------------------------------------------
# KTO: prompt + completion, and truncation that keeps the example


def _kto_ids(example: Example, messages: Sequence[Message], template: Template, tokenizer) -> tuple[list[int], int]:
    """(token ids of prompt + completion, number of prompt tokens) of `messages`, whose last turn is
    the rated completion. The whole text is tokenized at once (see the module docstring)."""
    rendered = template.render(messages, example.tools, origin=example.origin)
    completion = _kto_completion_span(example, messages, rendered.trained_spans)
    encoding = tokenizer(rendered.text[: completion.end], add_special_tokens=False, return_offsets_mapping=True)
    token_starts = [start for start, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), bisect.bisect_left(token_starts, completion.start)


def kto_budget(prompt_len: int, completion_len: int, cutoff_len: int) -> int:
    """The most prompt tokens a KTO example keeps when prompt + completion exceed cutoff_len.

    LLaMA-Factory's split of the budget: a completion shorter than half of cutoff_len is kept whole;
    else a prompt shorter than half is kept whole; else each keeps its share of the total length. The
    completion keeps at least its first token (a KTO example is about it), the prompt at least one
    token (the completion's first token is predicted from the prompt's last)."""
    if 2 * completion_len < cutoff_len:
        completion_keep = completion_len
    elif 2 * prompt_len < cutoff_len:
        completion_keep = cutoff_len - prompt_len
    else:
        completion_keep = cutoff_len * completion_len // (prompt_len + completion_len)
    return max(1, cutoff_len - max(1, min(completion_keep, completion_len)))


def truncate_kto(example: Example, template: Template, tokenizer, *, cutoff_len: int,
                 truncation_mode: str = "keep_end") -> EncodedExample | DroppedExample:
    """Encode a KTO example within cutoff_len tokens.

    keep_end (default): when prompt + completion exceed cutoff_len, the prompt gets `kto_budget`
    tokens and is cut from the left, where it matters least: whole earlier turns are left out (the
    system prompt stays if there is room), re-rendered by the template, so the prompt is exactly what
    the model would see for the shorter conversation; only when even the last user turn does not fit
    are its first tokens cut (a leading bos token is kept). The completion then keeps as many of its
    first tokens as the prompt leaves room for. No example with a completion is dropped.

    keep_start: the first cutoff_len tokens, as SFT; an example whose prompt alone fills cutoff_len
    is dropped.
    """
    messages = example.messages
    input_ids, prompt_len = _kto_ids(example, messages, template, tokenizer)
    num_tokens = len(input_ids)
    completion_len = num_tokens - prompt_len
    if num_tokens <= cutoff_len:
        return _kto_encoded(example, input_ids, prompt_len, num_tokens, 0, 0)
    if truncation_mode == "keep_start":
        if prompt_len >= cutoff_len:
            return DroppedExample(DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF, example.origin, num_tokens)
        return _kto_encoded(example, input_ids[:cutoff_len], prompt_len, num_tokens, 0, num_tokens - cutoff_len)

    budget = kto_budget(prompt_len, completion_len, cutoff_len)
    full_prompt_len = prompt_len
    if prompt_len > budget:
        input_ids, prompt_len = _shorter_prompt(example, template, tokenizer, budget)
        completion_len = len(input_ids) - prompt_len
    keep = min(completion_len, cutoff_len - prompt_len)
    if keep < 1:  # cutoff_len 1: no room for a prompt token and a completion token
        return DroppedExample(DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF, example.origin, num_tokens)
    return _kto_encoded(example, input_ids[: prompt_len + keep], prompt_len, num_tokens,
                        full_prompt_len - prompt_len, completion_len - keep)


def _shorter_prompt(example: Example, template: Template, tokenizer, budget: int) -> tuple[list[int], int]:
    """(ids, prompt_len) of the example with the most recent history whose prompt fits `budget` tokens.

    Candidates start at a user turn, latest history first dropped; for each start the system prompt is
    tried first. When none fits, the shortest one's prompt is cut to its last `budget` tokens."""
    messages = example.messages
    has_system = messages[0].role == "system"
    first = 1 if has_system else 0
    starts = [k for k in range(first, len(messages) - 1) if messages[k].role == "user"]
    candidates = []
    for k in starts:
        candidates += [[messages[0], *messages[k:]], list(messages[k:])] if has_system else [list(messages[k:])]
    best = None
    for candidate in candidates:
        if candidate == list(messages):  # the whole conversation: it is what did not fit
            continue
        best = _kto_ids(example, candidate, template, tokenizer)
        if best[1] <= budget:
            return best
    input_ids, prompt_len = best if best is not None else _kto_ids(example, messages, template, tokenizer)
    head = 1 if (budget >= 2 and input_ids[0] == tokenizer.bos_token_id) else 0  # keep <bos> first
    kept_prompt = input_ids[:head] + input_ids[prompt_len - (budget - head) : prompt_len]
    return kept_prompt + input_ids[prompt_len:], len(kept_prompt)


def _kto_encoded(example: Example, input_ids: list[int], prompt_len: int, num_tokens: int, prompt_cut: int,
                 completion_cut: int) -> EncodedExample:
    labels = [IGNORE_INDEX] * prompt_len + input_ids[prompt_len:]
    return EncodedExample(input_ids, labels, prompt_len, example.label, num_tokens, prompt_cut, completion_cut)


def _kto_completion_span(example: Example, messages: Sequence[Message], spans: Sequence[TrainedSpan]) -> TrainedSpan:
    """The span of the final assistant turn, after checking the example is a valid KTO example."""
    where = example.origin or "a KTO example"
    if example.label is None:
        raise UserError(
            f"{where}: a KTO example needs a label (desirable true/false); set the kto_tag column "
            "(or `label` / `preference`) for every record"
        )
    last_index = len(messages) - 1
    if last_index < 0 or messages[last_index].role != "assistant":
        last_role = messages[last_index].role if last_index >= 0 else "nothing"
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
