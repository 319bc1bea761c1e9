"""KTO, Kahneman–Tversky Optimization: learning from thumbs up / down on single replies.

For an example (x, y) with label desirable/undesirable, the policy π, the reference π_ref (the base
model: adapters off, or a frozen copy for full fine-tuning) and β = pref_beta:

    r(x, y) = log π(y|x) − log π_ref(y|x)                      the implied reward (summed over y's tokens)
    z0      = max(0, mean over KL pairs (x, y') of r(x, y'))   y' is another example's completion
    loss    = λ_D (1 − σ(β (r − z0)))   for a desirable example
              λ_U (1 − σ(β (z0 − r)))   for an undesirable one

`losses.kto_loss` holds that maths (tested against TRL's); this file runs it over a step. z0 is the
mean over every KL pair of the optimizer step (all micro-batches, all ranks), from a no-grad pass of
the policy before the step's backward passes, so a micro-batch of one still gets a mismatched pair.
The step's loss is the mean over its examples; `pref_ftx` adds an SFT term (the mean token NLL) on
desirable examples.
"""

from __future__ import annotations

import torch

from prospect.batching import Examples, batches_of, rank_share
from prospect.data.report import balance_advice, kto_balance
from prospect.forward import Window, backward, reduce_sums, sequence_logps, sync_unless_last
from prospect.losses import kto_loss, kto_reference_point
from prospect.reference import load_or_compute_reference, reference_key
from prospect.sharding import even_batches


class KTO:
    SUM_KEYS = ("loss_sum", "loss_count", "chosen_rewards", "num_chosen", "rejected_rewards", "num_rejected",
                "chosen_logps", "rejected_logps", "kl", "correct_sign")
    uses_reference_model = True
    base_row = False  # the base model is the reference: its rewards are 0 by definition
    fingerprint_note = " or the KTO reference model (model, adapters, precision)"
    PLOTS = (("training_loss.png", "Training loss · KTO", "KTO loss", ("loss",)),
             ("training_rewards.png", "KTO rewards", "implied reward β·log(π/π_ref)",
              ("rewards/chosen", "rewards/rejected", "rewards/margins")),
             ("training_kl.png", "KTO KL estimate", "KL (nats)", ("kl",)))

    def __init__(self, config) -> None:
        self.config = config

    def describe(self, train_set: Examples) -> str | None:
        labels = train_set.dataset["label"]
        num_desirable = sum(1 for label in labels if label)
        num_undesirable = len(labels) - num_desirable
        config = self.config
        _, suggested = kto_balance(num_desirable, num_undesirable, config.kto_chosen_weight, config.kto_rejected_weight)
        balanced = suggested is None and num_desirable and num_undesirable
        return (f"{'' if balanced else 'warning: '}KTO label balance: "
                f"{balance_advice(config, num_desirable, num_undesirable)}")

    def fingerprint(self, train_set: Examples) -> str:
        """The tokens and the reference model: the log-probs of the steps run so far came from it."""
        return reference_key(self.config, train_set)

    def prepare(self, splits, reference, *, accelerator, output_dir=None, on_save=None) -> int:
        """The reference log-probs of the examples each split needs (`reference.load_or_compute_reference`);
        returns the number of reference forward passes run."""
        return load_or_compute_reference(self.config, splits, reference, accelerator=accelerator,
                                         output_dir=output_dir, on_save=on_save)

    def metrics(self, s: dict) -> dict:
        """The logged means; `steps` is the loop's count of optimizer steps in the window (kl is z0 per step)."""
        out = {"loss": s["loss_sum"] / max(s["loss_count"], 1)}
        if s["num_chosen"]:
            out["rewards/chosen"] = s["chosen_rewards"] / s["num_chosen"]
            out["logps/chosen"] = s["chosen_logps"] / s["num_chosen"]
        if s["num_rejected"]:
            out["rewards/rejected"] = s["rejected_rewards"] / s["num_rejected"]
            out["logps/rejected"] = s["rejected_logps"] / s["num_rejected"]
        if s["num_chosen"] and s["num_rejected"]:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["kl"] = s["kl"] / max(s["steps"], 1)
        return out

    def step(self, examples: Examples, indices, micro_batches, hidden_model, head, accelerator) -> dict:
        """Forward and backward of one KTO optimizer step.

        1. z0: the policy's log-probs of every KL pair of the step (no gradient), minus the reference's,
           averaged over the whole step (all micro-batches, all ranks) and clamped at 0.
        2. For each micro-batch: the policy's completion log-probs, the KTO loss of each example, summed
           and divided by the number of examples in the step (so the step's loss is their mean).

        With one micro-batch (no accumulation) its forward runs first and keeps the prompts' keys and values
        (PromptCache), so the KL pass runs only the partners' completions. With accumulation the KL pass must
        precede every backward, so it runs first, on whole KL pairs.
        """
        world, device = accelerator.num_processes, accelerator.device
        # No-grad passes run on the module DDP wraps: a DDP forward broadcasts buffers, a collective. A
        # sharded model's forwards are collectives too, so every micro-batch runs its KL pass, a stand-in's
        # as well (its log-probs are dropped): every rank runs as many.
        no_grad_model = accelerator.unwrap_model(hidden_model)
        first_forward, cache = None, None  # (batch, policy log-probs) of the only micro-batch
        if len(micro_batches) == 1:  # true on every rank or on none: each rank's DDP forward comes first
            chunk, _ = micro_batches[0]
            batch = examples.targets(chunk)
            cache = examples.prompt_cache(chunk, hidden_model, batch)
            first_forward = batch, sequence_logps(hidden_model, head, batch, device, cache)[0]
        with torch.no_grad():
            if cache is not None:
                cache.extend()
                policy_kl = [sequence_logps(no_grad_model, head, examples.kl_continuations(micro_batches[0][0]),
                                            device, cache)[0].cpu()]
                cache.release()  # e.g. gradient checkpointing's recompute must not read it
            else:
                policy_kl = [sequence_logps(no_grad_model, head, examples.kl_pairs(chunk), device)[0].cpu()
                             for chunk, _ in micro_batches]
            paired = [(chunk, logps) for (chunk, weight), logps in zip(micro_batches, policy_kl) if weight > 0]
            reference_kl = examples.reference_kl_logps[[i for chunk, _ in paired for i in chunk]]
            reference_point = global_reference_point([logps for _, logps in paired], reference_kl,
                                                     accelerator).to(device)

        step_examples_count = len(indices)
        sums = dict.fromkeys(self.SUM_KEYS + ("tokens", "trained_tokens"), 0.0)
        for number, (chunk, weight) in enumerate(micro_batches):
            labels = examples.labels(chunk).to(device)
            with sync_unless_last(accelerator, hidden_model, number, len(micro_batches)):
                if first_forward is None:
                    batch = examples.targets(chunk)
                    policy_logps = sequence_logps(hidden_model, head, batch, device)[0]
                else:
                    batch, policy_logps = first_forward
                losses, rewards = kto_loss(
                    policy_logps, examples.reference_logps[chunk].to(device), labels, reference_point,
                    beta=self.config.pref_beta, chosen_weight=self.config.kto_chosen_weight,
                    rejected_weight=self.config.kto_rejected_weight,
                )
                if self.config.pref_ftx > 0:  # an SFT term on desirable completions: mean token NLL, weighted
                    num_targets = torch.tensor(examples.num_trained_targets[chunk], device=device)
                    losses = losses + self.config.pref_ftx * labels * (-policy_logps / num_targets.clamp(min=1))
                backward(accelerator, losses.sum() * (weight * world / step_examples_count))
            for key, value in kto_sums(losses, rewards, policy_logps, labels, weight).items():
                sums[key] += value
            sums["tokens"] += batch.num_tokens * weight
            sums["trained_tokens"] += batch.num_trained_tokens * weight
        # Every rank adds the same z0; divided by the world size, the all-reduce gives it back once.
        sums["kl"] = float(reference_point) / world
        return sums

    @torch.no_grad()
    def evaluate(self, examples: Examples, hidden_model, head, accelerator) -> dict:
        """Held-out metrics: the loss with z0 over all eval KL pairs, the rewards, and `rewards/accuracy`,
        the share of examples whose implied reward has their label's sign."""
        hidden_model.eval()
        model = accelerator.unwrap_model(hidden_model)  # ranks may run different numbers of forwards (see step)
        mine = list(rank_share(len(examples), accelerator.process_index, accelerator.num_processes))
        runs = even_batches(batches_of(mine, self.config.per_device_eval_batch_size), [0], model, accelerator)
        chunks = [chunk for chunk, keep in runs if keep]
        window = Window(self.SUM_KEYS)
        policy_kl = [sequence_logps(model, head, examples.kl_pairs(chunk), accelerator.device)[0].cpu()
                     for chunk, _ in runs]
        policy_logps = [sequence_logps(model, head, examples.targets(chunk), accelerator.device)[0].cpu()
                        for chunk, _ in runs]
        policy_kl, policy_logps = policy_kl[: len(chunks)], policy_logps[: len(chunks)]  # a filler's are dropped
        reference_point = global_reference_point(  # z0 over every eval KL pair
            policy_kl, examples.reference_kl_logps[mine], accelerator)
        for chunk, logps in zip(chunks, policy_logps):
            labels = examples.labels(chunk)
            losses, rewards = kto_loss(logps, examples.reference_logps[chunk], labels, reference_point,
                                       beta=self.config.pref_beta, chosen_weight=self.config.kto_chosen_weight,
                                       rejected_weight=self.config.kto_rejected_weight)
            window.add(kto_sums(losses, rewards, logps, labels))
        window.sums = reduce_sums(window.sums, accelerator)
        window.sums["kl"], window.sums["steps"] = float(reference_point), 1
        metrics = self.metrics(window.sums)
        metrics["rewards/accuracy"] = window.sums["correct_sign"] / len(examples)
        return metrics


def global_reference_point(policy_kl_logps: list[torch.Tensor], reference_kl_logps, accelerator) -> torch.Tensor:
    """KTO's z0 over the KL pairs of all ranks (`kto_reference_point` of all of them): each rank's mean
    weighted by its count, then clamped. A rank may hold no pair (a short last step, a small eval set)."""
    if not policy_kl_logps:
        local_mean, count = 0.0, 0
    else:
        policy = torch.cat(policy_kl_logps)
        local_mean, count = float(kto_reference_point(policy, reference_kl_logps, clamp=False)), len(policy)
    totals = reduce_sums({"sum": local_mean * count, "count": count}, accelerator)
    return torch.tensor(totals["sum"] / totals["count"]).clamp(min=0)


def kto_sums(losses, rewards, policy_logps, labels, weight: float = 1.0) -> dict:
    chosen, rejected = labels, ~labels
    return {
        "loss_sum": float(losses.detach().sum()) * weight,
        "loss_count": len(labels) * weight,
        "chosen_rewards": float(rewards[chosen].sum()) * weight,
        "num_chosen": int(chosen.sum()) * weight,
        "rejected_rewards": float(rewards[rejected].sum()) * weight,
        "num_rejected": int(rejected.sum()) * weight,
        "chosen_logps": float(policy_logps.detach()[chosen].sum()) * weight,
        "rejected_logps": float(policy_logps.detach()[rejected].sum()) * weight,
        "correct_sign": float(((rewards > 0) == labels).sum()) * weight,
    }
