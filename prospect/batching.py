"""Which examples each optimizer step trains on, and the split's examples as packed batches.

- `plan_schedule` / `step_examples` / `rank_micro_batches`: the data order is a function of (seed,
  epoch) only, so a resumed run sees the same batches; a step's examples are split over ranks and
  micro-batches, each with the weight that keeps the step's normalisation exact. The rated turns of
  one conversation (KTO) stay next to each other in that order, so a micro-batch usually holds them
  together and computes the conversation once (`packing.shared_hosts`).
- `Examples`: one split's encoded rows, packed on demand (`targets`), with KTO's KL pairs
  (`kl_pairs`, `kl_continuations`), the prompt cache that lets a KL pass reuse the prompts' keys and
  values (`prompt_cache`), the reference log-probs once computed, and a fingerprint of it all.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from prospect.config import RunConfig
from prospect.data.encode import IGNORE_INDEX
from prospect.data.example import conversation_of
from prospect.errors import UserError
from prospect.losses import kl_partners
from prospect.packing import PACKED_ATTENTIONS, PackedBatch, PromptCache, pack, shared_hosts


@dataclass(frozen=True)
class Schedule:
    num_examples: int
    micro_batch_size: int  # per_device_train_batch_size
    accumulation_steps: int
    world_size: int
    steps_per_epoch: int
    total_steps: int
    conversation_sizes: tuple[int, ...] = ()  # sizes of the runs of examples shuffled as one; () = each alone

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size


def plan_schedule(num_examples: int, config: RunConfig, world_size: int,
                  conversation_sizes: tuple[int, ...] = ()) -> Schedule:
    global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(num_examples / global_batch)  # the last step of an epoch may be smaller
    total = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.num_train_epochs)
    return Schedule(num_examples, config.per_device_train_batch_size, config.gradient_accumulation_steps,
                    world_size, steps_per_epoch, max(1, total), tuple(conversation_sizes))


def epoch_order(schedule: Schedule, seed: int, epoch: int) -> list[int]:
    """The order of the examples in `epoch`: a permutation drawn from (seed, epoch) only, of whole
    conversations where the schedule has them (each conversation's examples in their own order)."""
    bounds = np.cumsum((0,) + (schedule.conversation_sizes or (1,) * schedule.num_examples)).tolist()
    assert bounds[-1] == schedule.num_examples, "the conversation sizes must add up to the number of examples"
    groups = [range(start, end) for start, end in zip(bounds[:-1], bounds[1:])]
    random.Random(f"{seed}-{epoch}").shuffle(groups)  # the same permutation as of the indices when all are alone
    return [index for group in groups for index in group]


def step_examples(schedule: Schedule, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based), the same on every rank."""
    epoch, position = divmod(step, schedule.steps_per_epoch)
    start = position * schedule.global_batch_size
    return epoch_order(schedule, seed, epoch)[start : start + schedule.global_batch_size]


def examples_of_steps(schedule: Schedule, seed: int, first_step: int) -> list[int]:
    """The sorted indices of every example that steps first_step .. total_steps − 1 train on."""
    needed: set[int] = set()
    step = first_step
    while step < schedule.total_steps and len(needed) < schedule.num_examples:
        epoch, position = divmod(step, schedule.steps_per_epoch)
        end = min(schedule.total_steps, (epoch + 1) * schedule.steps_per_epoch)  # this epoch's steps in range
        order = epoch_order(schedule, seed, epoch)
        needed.update(order[position * schedule.global_batch_size :
                            (end - epoch * schedule.steps_per_epoch) * schedule.global_batch_size])
        step = end
    return sorted(needed)


def rank_micro_batches(indices: list[int], schedule: Schedule, rank: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of one step, as (example indices, loss weight).

    A full step gives every rank `accumulation_steps` micro-batches of `micro_batch_size`. The short
    last step of an epoch is spread evenly; a slot left without an example gets a stand-in example
    with weight 0, because every rank must run the same number of backward passes (DDP all-reduces
    in each)."""
    slots = schedule.accumulation_steps * schedule.world_size
    per_slot = [len(chunk) for chunk in np.array_split(np.arange(len(indices)), slots)]
    bounds = np.cumsum([0] + per_slot)
    micro_batches = []
    for micro in range(schedule.accumulation_steps):
        slot = micro * schedule.world_size + rank
        chunk = indices[bounds[slot] : bounds[slot + 1]]
        micro_batches.append((chunk, 1.0) if chunk else ([indices[0]], 0.0))
    return micro_batches


class Examples:
    """One split's encoded examples and, for KTO, each example's KL partner and reference log-probs."""

    def __init__(self, dataset, *, stage: str, cutoff_len: int, seed: int):
        self.dataset = dataset.select_columns(["input_ids", "labels", "prompt_len", "label"])
        self.stage = stage
        # The record each example comes from: KTO's rated turns of one record share a forward pass.
        numbers: dict[str, int] = {}
        self.conversations = [numbers.setdefault(conversation_of(origin), len(numbers))
                              for origin in dataset.select_columns(["origin"])[:]["origin"]]
        self.cutoff_len = cutoff_len
        # Columns written at encode time, read through the dataset's indexing: a split (val_size) or the
        # selection of kept rows is an index mapping over the stored table, which only indexing applies.
        counts = dataset.select_columns(["num_trained_targets", "num_tokens"]).with_format("numpy")[:]
        self.num_trained_targets = counts["num_trained_targets"].astype(np.int64)  # [N] tokens with loss
        self.num_tokens = counts["num_tokens"].astype(np.int64)  # [N]
        self.partners: list[int] | None = None
        # [N] summed completion log-probs of the reference model, and the same for each KL pair; NaN
        # where not computed (the reference pass computes only what the run trains and evaluates on).
        self.reference_logps: torch.Tensor | None = None
        self.reference_kl_logps: torch.Tensor | None = None
        if stage == "kto":
            if len(dataset) < 2:
                raise UserError("stage: kto needs at least 2 examples (each is paired with another for the KL term).")
            self.partners = kl_partners(len(dataset), seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor(self.dataset[indices]["label"], dtype=torch.bool)

    @property
    def conversation_sizes(self) -> tuple[int, ...]:
        """Sizes of the runs of consecutive examples from one conversation (a record's rated turns)."""
        return tuple(len(list(run)) for _, run in itertools.groupby(self.conversations))

    def targets(self, indices: list[int]) -> PackedBatch:
        """The examples packed, rated turns of one conversation sharing its sequence where they can."""
        rows = self.dataset[indices]
        sequences = list(zip(rows["input_ids"], rows["labels"]))
        conversations = [self.conversations[i] for i in indices]
        if len(set(conversations)) == len(conversations):  # nothing to share
            return pack(sequences)
        return pack(sequences, shared_hosts(sequences, conversations))

    def _kl_pair_ids(self, indices: list[int]) -> list[tuple[list[int], int]]:
        """(prompt of example i + completion of its partner, cut to cutoff_len; the prompt's length) per index."""
        rows = self.dataset[indices]
        partners = self.dataset[[self.partners[i] for i in indices]]
        return [
            ((ids[:prompt_len] + partner_ids[partner_prompt_len:])[: self.cutoff_len], prompt_len)
            for ids, prompt_len, partner_ids, partner_prompt_len in zip(
                rows["input_ids"], rows["prompt_len"], partners["input_ids"], partners["prompt_len"])
        ]

    def kl_pairs(self, indices: list[int]) -> PackedBatch:
        """Prompt of example i + completion of its partner, cut to cutoff_len; the completion is trained."""
        return pack([(pair, [IGNORE_INDEX] * prompt_len + pair[prompt_len:])
                     for pair, prompt_len in self._kl_pair_ids(indices)])

    def kl_continuations(self, indices: list[int]) -> PackedBatch:
        """The KL pairs of `kl_pairs` from their last prompt token on, at their positions in the pair: what
        the policy runs on top of a `PromptCache` of the prompts (all but their last token), captured by
        the forward over `targets(indices)`. Same log-probs as `kl_pairs`, without computing prompts twice."""
        pairs = self._kl_pair_ids(indices)
        batch = pack([(pair[prompt_len - 1 :], [IGNORE_INDEX] + pair[prompt_len:]) for pair, prompt_len in pairs])
        offsets = torch.tensor([prompt_len - 1 for _, prompt_len in pairs])
        batch.position_ids += offsets.repeat_interleave(batch.cu_seq_lens.diff())  # one sequence per example
        return batch

    def prompt_cache(self, indices: list[int], hidden_model, batch: PackedBatch) -> PromptCache | None:
        """A `PromptCache` for the prompts of `indices` (all but their last token) in `batch`, their
        `targets`, or None where it cannot be used: an attention backend other than prospect's packed
        ones, or a prompt of 0 tokens or longer than cutoff_len."""
        model = getattr(hidden_model, "module", hidden_model)  # DDP wraps the HiddenStates module
        if model.causal_lm().config._attn_implementation not in PACKED_ATTENTIONS:
            return None
        prompt_lens = self.dataset[indices]["prompt_len"]
        if not prompt_lens or min(prompt_lens) < 1 or max(prompt_lens) > self.cutoff_len:
            return None
        return PromptCache([(start, n - 1) for start, n in zip(batch.example_starts, prompt_lens)])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the split's token ids, labels, prompt lengths and KL pairing, row by row in the
        split's order: what the reference log-probs (and a resumed run's data) depend on."""
        h = hashlib.sha256()
        table = self.dataset.with_format("arrow")[:]  # the split's own rows (its index mapping applied)
        for name in ("input_ids", "labels", "prompt_len"):
            column = table.column(name).combine_chunks()
            if hasattr(column, "flatten"):  # a list column: each row's length, then every value
                h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                column = column.flatten()
            h.update(column.to_numpy(zero_copy_only=False).tobytes())
        h.update(json.dumps(self.partners).encode())
        return h.hexdigest()


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def rank_share(count: int, rank: int, world: int) -> range:
    """This rank's consecutive share of `count` items (evaluation, the reference pass): consecutive, so
    the rated turns of one conversation, next to each other, share a forward pass."""
    return range(rank * count // world, (rank + 1) * count // world)
