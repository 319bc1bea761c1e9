"""Loss maths for SFT and KTO: per-token log-probs from hidden states, the KTO loss, KL pairs.

Pure functions on tensors (no model, no config, no process state), so the training loop, the
reference-log-prob cache and the tests all use the same code. `kto_loss` has the KTO maths.

Shapes in names and docstrings: T tokens, H hidden size, V vocabulary size, B examples.
This module imports only torch: the training code imports it, nothing at CLI start-up does.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # same as prospect.data.encode.IGNORE_INDEX (not imported: keep this module torch-only)


# --------------------------------------------------------------------------------------------------
# Per-token log-probs without full-vocabulary logits


def token_logps(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, *, chunk_size: int = 512
) -> torch.Tensor:
    """log p(targets[t] | hidden[t]) in float32, 0.0 where targets[t] == -100.

    `hidden`: [T, H] (or [..., H]) final hidden states, after the final norm; `lm_head`: the
    output-embedding module (usually `nn.Linear(H, V, bias=False)`); `targets`: [T] (or [...])
    long, the next-token id of each position, -100 where there is none. Returns targets' shape.

        logits_t = lm_head(hidden_t)                      (cast to float32)
        logp_t   = logits_t[y_t] − logsumexp(logits_t)

    Only positions with a target go through the head, `chunk_size` of them at a time, so float32
    logits exist for at most chunk_size × V entries. The matmul itself runs in the weights' dtype
    (bfloat16 weights: bfloat16 matmul, float32 softmax), as `lm_head(hidden).float()` would.

    Gradients, by case:
    - no grad needed: plain chunk loop.
    - `lm_head` is exactly `nn.Linear` and frozen (LoRA): a custom autograd Function computes,
      in the forward pass, d logp_t / d hidden_t = (onehot(y_t) − softmax_t) @ W = W[y_t] − softmax_t @ W
      and saves only that [T, H] tensor; backward is grad_output[:, None] * saved (no recompute).
    - trainable head (full fine-tuning) or another module (e.g. a LoRA-wrapped head): each chunk
      runs under activation checkpointing, so backward recomputes one chunk's logits at a time and
      gradients reach both `hidden` and the head's parameters.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    weight_dtype = next(lm_head.parameters()).dtype
    if weight_dtype.is_floating_point and hidden.dtype != weight_dtype:
        hidden = hidden.to(weight_dtype)  # mixed precision hands over float32 hidden states for bf16 weights
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    targets_1d = targets.reshape(-1)  # [T]
    has_target = targets_1d != IGNORE_INDEX
    hidden_used, targets_used = hidden_2d[has_target], targets_1d[has_target]  # prompts and padding cost nothing

    head_trains = any(p.requires_grad for p in lm_head.parameters())
    if not (torch.is_grad_enabled() and (hidden.requires_grad or head_trains)):
        with torch.no_grad():
            if type(lm_head) is nn.Linear:
                logps_used, _ = _linear_logps(hidden_used, lm_head.weight, lm_head.bias, targets_used, chunk_size,
                                              with_grad=False)
            else:
                pieces = [_chunk_logps(lm_head, h, y) for h, y in _chunks(hidden_used, targets_used, chunk_size)]
                logps_used = torch.cat(pieces)
    elif type(lm_head) is nn.Linear and not head_trains:  # exact type: quantized/FSDP subclasses need their own forward
        logps_used = _FrozenLinearLogps.apply(hidden_used, lm_head.weight, lm_head.bias, targets_used, chunk_size)
    else:
        pieces = [
            checkpoint(_chunk_logps, lm_head, h, y, use_reentrant=False)
            for h, y in _chunks(hidden_used, targets_used, chunk_size)
        ]
        logps_used = torch.cat(pieces)

    logps = torch.zeros(targets_1d.shape, dtype=torch.float32, device=hidden.device)
    return logps.masked_scatter(has_target, logps_used).view(targets.shape)


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int):
    # split() of an empty tensor yields one empty chunk, so torch.cat always has something to join.
    return zip(hidden.split(chunk_size), targets.split(chunk_size))


def _chunk_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[C, H], [C] -> [C] float32 log-probs of the targets (one chunk, any head)."""
    # A plain Linear's weight is used directly, not through the module: under ZeRO-3 calling the module
    # would gather its weight once per chunk, a collective that ranks with other token counts miscount.
    logits = (F.linear(hidden, lm_head.weight, lm_head.bias) if type(lm_head) is nn.Linear
              else lm_head(hidden)).float()  # [C, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _linear_logps(hidden, weight, bias, targets, chunk_size: int, *, with_grad: bool):
    """Log-probs [T] of a linear head, chunk by chunk, and with_grad: d logp_t / d hidden_t [T, H].

    Each chunk's float32 logits live in one [C, V] buffer that every chunk reuses and that is worked
    on in place: logsumexp as max + log Σ exp(logits − max), then, for the gradient,
    onehot(y) − softmax = onehot(y) − exp(logits − max) / Σ, and d logp / d hidden = that @ W.
    No other [C, V] tensor is made (torch's logsumexp would allocate one), and the buffer is
    allocated once, so the allocator does not hand back and re-fault C × V × 4 bytes per chunk.
    """
    device = hidden.device
    logps = torch.empty(targets.shape, dtype=torch.float32, device=device)  # [T]
    dlogp_dhidden = torch.empty_like(hidden) if with_grad else None  # [T, H]
    # matmul straight into the float32 buffer when nothing casts (float32 weights, no autocast)
    direct = (weight.dtype == hidden.dtype == torch.float32 and not torch.is_autocast_enabled(device.type))
    buffer = torch.empty((min(chunk_size, len(targets)), weight.shape[0]), dtype=torch.float32, device=device) \
        if direct else None
    for start in range(0, len(targets), chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if direct:
            logits = torch.mm(h, weight.t(), out=buffer[: len(y)])  # [C, V]
            if bias is not None:
                logits.add_(bias)
        else:
            logits = F.linear(h, weight, bias).float()  # bfloat16 matmul, float32 softmax
        target_logits = logits.gather(-1, y[:, None]).squeeze(-1)
        max_logits = logits.amax(-1, keepdim=True)
        sum_exp = logits.sub_(max_logits).exp_().sum(-1, keepdim=True)  # logits now hold exp(logits − max)
        logps[start : start + len(y)] = target_logits - (max_logits + sum_exp.log()).squeeze(-1)
        if with_grad:
            dlogp_dlogits = logits.mul_(sum_exp.reciprocal().neg_())  # −softmax
            dlogp_dlogits[torch.arange(len(y), device=y.device), y] += 1.0  # onehot(y) − softmax
            out = dlogp_dhidden[start : start + len(y)]
            if direct:
                torch.mm(dlogp_dlogits, weight, out=out)
            else:
                out.copy_(dlogp_dlogits.to(weight.dtype) @ weight)
    return logps, dlogp_dhidden


class _FrozenLinearLogps(torch.autograd.Function):
    """token_logps for a frozen `nn.Linear` head: the gradient w.r.t. hidden is computed forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):  # [T, H], [V, H], [V] | None, [T], int
        logps, dlogp_dhidden = _linear_logps(hidden, weight, bias, targets, chunk_size, with_grad=True)
        ctx.save_for_backward(dlogp_dhidden)  # the only thing kept for backward
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # [T] float32
        (dlogp_dhidden,) = ctx.saved_tensors
        return grad_logps.to(dlogp_dhidden.dtype)[:, None] * dlogp_dhidden, None, None, None, None


# --------------------------------------------------------------------------------------------------
# KTO (arXiv 2402.01306, as TRL's KTOTrainer computes it)


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    labels: torch.Tensor,
    reference_point: torch.Tensor,
    *,
    beta: float,
    chosen_weight: float,
    rejected_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses [B] and rewards [B] (detached).

    `policy_logps`, `reference_logps`: [B] summed completion log-probs (prompt masked);
    `labels`: [B] bool, True = desirable; `reference_point`: scalar z0 from `kto_reference_point`.

        r_i      = policy_logps_i − reference_logps_i
        loss_i   = λ_D · (1 − σ(β (r_i − z0)))   if desirable
                   λ_U · (1 − σ(β (z0 − r_i)))   if undesirable
        reward_i = β r_i

    with β = `beta`, λ_D = `chosen_weight`, λ_U = `rejected_weight`. The caller takes the mean over
    the batch (as TRL's KTOTrainer does), so losses are returned per example.
    """
    logratios = policy_logps - reference_logps  # [B]
    desirable_losses = chosen_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = rejected_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    losses = torch.where(labels.to(torch.bool), desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()


def kto_reference_point(
    policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor, *, clamp: bool = True
) -> torch.Tensor:
    """KTO reference point z0 = max(0, mean_i(policy_kl_logps_i − reference_kl_logps_i)), detached.

    Inputs are [B] summed log-probs of mismatched pairs (example i's prompt with its partner's
    completion, see `kl_partners`): a batch estimate of KL(π_θ ‖ π_ref). No gradient flows through z0.

    Distributed training averages the estimate across ranks *before* clamping: call with
    `clamp=False`, all-reduce-average the scalar, then `.clamp(min=0)` — as TRL does.
    """
    kl = (policy_kl_logps - reference_kl_logps).mean().detach()
    return kl.clamp(min=0) if clamp else kl


def kl_partners(num_examples: int, seed: int) -> list[int]:
    """partners[i] = j ≠ i: the example whose completion is paired with example i's prompt for the KL estimate.

    The pairing is a uniformly random cyclic permutation of range(num_examples) (what Sattolo's
    algorithm draws), made by shuffling the examples with `random.Random(seed)` and pairing each
    with the next one round the circle. A cycle never maps an example to itself, uses every
    completion exactly once, and takes O(n) (~0.5 s for 1e6 examples). Pairing is over the whole
    dataset, not inside a micro-batch (TRL shifts by one inside the batch), so a micro-batch of 1
    still gets a mismatched pair. Deterministic for a seed.
    """
    if num_examples < 2:
        raise ValueError(
            f"KTO needs at least 2 examples to pair prompts with other examples' completions "
            f"for the KL estimate, got {num_examples}"
        )
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    partners = [0] * num_examples
    for example, following in zip(order, order[1:] + order[:1]):  # the last one wraps round to the first
        partners[example] = following
    return partners
