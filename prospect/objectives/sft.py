"""Supervised fine-tuning: the mean negative log-likelihood of the trained tokens.

A step's loss is −Σ log p(target token) over every trained token of the step (all micro-batches, all
ranks) divided by their number, so batch 8 × accumulation 1, batch 1 × accumulation 8 and 2 ranks ×
batch 4 give the same update.
"""

from __future__ import annotations

import torch

from prospect.batching import Examples, batches_of, rank_share
from prospect.forward import Window, backward, reduce_sums, sequence_logps, sync_unless_last
from prospect.sharding import even_batches


class SFT:
    SUM_KEYS = ("loss_sum", "loss_count")
    uses_reference_model = False
    base_row = True  # the base model's held-out loss is the baseline
    fingerprint_note = ""
    PLOTS = (("training_loss.png", "Training loss · SFT", "cross-entropy loss (nats/token)", ("loss",)),)

    def __init__(self, config) -> None:
        self.config = config

    def describe(self, train_set: Examples) -> str | None:
        return None

    def fingerprint(self, train_set: Examples) -> str:
        return train_set.fingerprint

    def prepare(self, splits, reference, *, accelerator, output_dir=None, on_save=None) -> int:
        return 0  # nothing to compute before training

    def metrics(self, sums: dict) -> dict:
        return {"loss": sums["loss_sum"] / max(sums["loss_count"], 1)}

    def step(self, examples: Examples, indices, micro_batches, hidden_model, head, accelerator) -> dict:
        """Forward and backward of one SFT optimizer step: loss = −Σ log p / (trained tokens of the step)."""
        world = accelerator.num_processes
        step_tokens = int(examples.num_trained_targets[indices].sum())
        sums = {"loss_sum": 0.0, "loss_count": 0.0, "tokens": 0.0, "trained_tokens": 0.0}
        for number, (chunk, weight) in enumerate(micro_batches):
            batch = examples.targets(chunk)
            with sync_unless_last(accelerator, hidden_model, number, len(micro_batches)):
                _, per_token = sequence_logps(hidden_model, head, batch, accelerator.device)
                nll = -per_token.sum()
                backward(accelerator, nll * (weight * world / step_tokens))
            sums["loss_sum"] += float(nll.detach()) * weight
            sums["loss_count"] += batch.num_trained_tokens * weight
            sums["tokens"] += batch.num_tokens * weight
            sums["trained_tokens"] += batch.num_trained_tokens * weight
        return sums

    @torch.no_grad()
    def evaluate(self, examples: Examples, hidden_model, head, accelerator) -> dict:
        """Held-out mean token NLL."""
        hidden_model.eval()
        model = accelerator.unwrap_model(hidden_model)  # ranks may run different numbers of forwards
        mine = list(rank_share(len(examples), accelerator.process_index, accelerator.num_processes))
        window = Window(self.SUM_KEYS)
        for chunk, keep in even_batches(batches_of(mine, self.config.per_device_eval_batch_size), [0], model,
                                        accelerator):
            batch = examples.targets(chunk)
            _, per_token = sequence_logps(model, head, batch, accelerator.device)
            if keep:  # (a sharded model's filler forward is dropped)
                window.add({"loss_sum": float(-per_token.sum()), "loss_count": batch.num_trained_tokens})
        return self.metrics(reduce_sums(window.sums, accelerator))
