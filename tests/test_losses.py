"""Loss maths: chunked log-probs equal a naive log_softmax, KTO equals TRL's, KL pairs never self-pair."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from prospect.losses import IGNORE_INDEX, kl_partners, kto_loss, kto_reference_point, token_logps

T, H, V = 37, 16, 101
CHUNK_SIZES = [1, 5, 16, 36, 1024]  # none divides T = 37 but the last two (one chunk)


def make_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator)
    targets = torch.randint(0, V, (T,), generator=generator)
    targets[[0, 1, 2, 17, T - 1]] = IGNORE_INDEX  # a masked prompt, one in the middle, the last position
    return hidden, targets


def make_head(bias=False, dtype=torch.float32, trainable=False, seed=1):
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=bias).to(dtype)
    head.requires_grad_(trainable)
    return head


def naive_logps(hidden, head, targets):
    """Full float32 logits, log_softmax, gather: the oracle."""
    logits = head(hidden).float()
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return logps.masked_fill(targets == IGNORE_INDEX, 0.0)


def values_and_grads(fn, hidden, head, targets, weights):
    """fn's log-probs and the gradients of sum(weights * logps) w.r.t. hidden and the head's trainable parameters."""
    hidden = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    logps = fn(hidden, head, targets)
    (weights * logps).sum().backward()
    param_grads = {name: p.grad.clone() for name, p in head.named_parameters() if p.requires_grad}
    return logps.detach(), hidden.grad, param_grads


def assert_same_as_naive(hidden, head, targets, chunk_size, atol=1e-5):
    weights = torch.linspace(-1.0, 2.0, T)  # a non-uniform upstream gradient

    def chunked_logps(h, m, y):
        return token_logps(h, m, y, chunk_size=chunk_size)

    chunked = values_and_grads(chunked_logps, hidden, head, targets, weights)
    naive = values_and_grads(naive_logps, hidden, head, targets, weights)
    assert chunked[0].dtype == torch.float32
    torch.testing.assert_close(chunked[0], naive[0], atol=atol, rtol=0)
    torch.testing.assert_close(chunked[1], naive[1], atol=atol, rtol=0)
    assert chunked[2].keys() == naive[2].keys()
    for name in naive[2]:
        torch.testing.assert_close(chunked[2][name], naive[2][name], atol=atol, rtol=0, msg=name)
    assert (chunked[0][targets == IGNORE_INDEX] == 0).all()
    assert (chunked[1][targets == IGNORE_INDEX] == 0).all()


class LowRankHead(nn.Module):
    """A head that is not a plain Linear: frozen base + trainable low-rank update, like a LoRA-wrapped head."""

    def __init__(self):
        super().__init__()
        self.base = make_head(trainable=False)
        self.down = nn.Parameter(torch.randn(4, H) * 0.3)
        self.up = nn.Parameter(torch.randn(V, 4) * 0.3)

    def forward(self, hidden):
        return self.base(hidden) + hidden @ self.down.T @ self.up.T


# --------------------------------------------------------------------------------------------------
# token_logps


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_token_logps_frozen_head_matches_naive(chunk_size, bias):
    hidden, targets = make_inputs()
    assert_same_as_naive(hidden, make_head(bias=bias), targets, chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_token_logps_trainable_head_matches_naive(chunk_size, bias):
    hidden, targets = make_inputs()
    assert_same_as_naive(hidden, make_head(bias=bias, trainable=True), targets, chunk_size)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_token_logps_wrapped_head_matches_naive(chunk_size):
    hidden, targets = make_inputs()
    assert_same_as_naive(hidden, LowRankHead(), targets, chunk_size)


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_token_logps_without_grad_and_with_batch_dims(chunk_size):
    hidden, targets = make_inputs()
    head = make_head(trainable=True)
    expected = naive_logps(hidden, head, targets).detach()
    with torch.no_grad():
        logps = token_logps(hidden, head, targets, chunk_size=chunk_size)
    assert not logps.requires_grad
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    # a padded [B, L, H] batch gives [B, L] (T = 37 = 1 × 37)
    batched = token_logps(hidden[None], head, targets[None], chunk_size=chunk_size)
    assert batched.shape == (1, T)
    torch.testing.assert_close(batched[0].detach(), expected, atol=1e-5, rtol=0)


def test_token_logps_all_targets_masked_still_backpropagates():
    hidden, targets = make_inputs()
    hidden.requires_grad_(True)
    logps = token_logps(hidden, make_head(), torch.full_like(targets, IGNORE_INDEX), chunk_size=5)
    assert (logps == 0).all()
    logps.sum().backward()  # a batch with nothing to train must not break the step
    assert (hidden.grad == 0).all()


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_token_logps_bfloat16_close_to_float32(trainable):
    hidden, targets = make_inputs()
    hidden_bf16, head_bf16 = hidden.bfloat16(), make_head(dtype=torch.bfloat16, trainable=trainable)
    # the oracle: float32 maths on exactly the bfloat16 values
    head_from_bf16 = make_head(trainable=trainable)
    head_from_bf16.weight.data.copy_(head_bf16.weight.float())
    weights = torch.linspace(-1.0, 2.0, T)
    logps, grad_hidden, _ = values_and_grads(
        lambda h, m, y: token_logps(h, m, y, chunk_size=8), hidden_bf16, head_bf16, targets, weights
    )
    expected, expected_grad, _ = values_and_grads(naive_logps, hidden_bf16.float(), head_from_bf16, targets, weights)
    assert logps.dtype == torch.float32 and grad_hidden.dtype == torch.bfloat16
    # the bfloat16 matmul is off by ~3e-3 here; a bfloat16 softmax/logsumexp (|logp| ~ 5) would be off by ~2e-2
    torch.testing.assert_close(logps, expected, atol=1e-2, rtol=0)
    torch.testing.assert_close(grad_hidden.float(), expected_grad, atol=1e-2, rtol=0)


def saved_bytes_for_backward(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() builds its graph."""
    sizes: list[int] = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(sizes)


def test_token_logps_frozen_head_keeps_no_logits_for_backward():
    tokens, hidden_size, vocab = 64, 32, 8192
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    head = nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    logits_bytes = tokens * vocab * 4
    hidden_bytes = tokens * hidden_size * 4

    naive = saved_bytes_for_backward(lambda: naive_logps(hidden, head, targets))
    assert naive >= logits_bytes  # the probe sees the logits when they are kept

    for chunk_size in (16, tokens):
        ours = saved_bytes_for_backward(lambda: token_logps(hidden, head, targets, chunk_size=chunk_size))
        # d logp / d hidden [T, H], plus index masks of T entries
        assert ours <= hidden_bytes + 16 * tokens, (ours, hidden_bytes, logits_bytes)


# --------------------------------------------------------------------------------------------------
# KTO loss: against a hand computation and against TRL's KTOTrainer


def random_logps(generator, batch, tokens=6):
    """Per-token log-probs [B, L-1] of a policy and a reference nearby, as a stand-in model would give."""
    policy = -3 * torch.rand(batch, tokens - 1, generator=generator)
    reference = policy + 0.5 * torch.randn(batch, tokens - 1, generator=generator)
    return policy, reference


def test_kto_loss_by_hand():
    policy = torch.tensor([-4.0, -6.0, -5.0])
    reference = torch.tensor([-5.0, -5.5, -5.0])
    labels = torch.tensor([True, False, True])
    z0 = torch.tensor(0.25)
    losses, rewards = kto_loss(policy, reference, labels, z0, beta=0.5, chosen_weight=1.5, rejected_weight=0.8)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    # r = (1, -0.5, 0); β(r − z0) for the desirable ones, β(z0 − r) for the undesirable one
    expected = [1.5 * (1 - sigmoid(0.5 * 0.75)), 0.8 * (1 - sigmoid(0.5 * 0.75)), 1.5 * (1 - sigmoid(0.5 * -0.25))]
    torch.testing.assert_close(losses, torch.tensor(expected), atol=1e-7, rtol=0)
    torch.testing.assert_close(rewards, torch.tensor([0.5, -0.25, 0.0]))


def test_kto_gradients_only_through_policy():
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    policy_kl = torch.tensor([-3.0, -7.0], requires_grad=True)
    z0 = kto_reference_point(policy_kl, torch.tensor([-4.0, -5.0]))
    assert not z0.requires_grad and z0.item() == 0.0  # mean(1, -2) = -0.5, clamped
    assert kto_reference_point(policy_kl, torch.tensor([-4.0, -5.0]), clamp=False).item() == -0.5
    reference, labels = torch.tensor([-5.0, -5.0]), torch.tensor([True, False])
    losses, rewards = kto_loss(policy, reference, labels, z0, beta=0.1, chosen_weight=1.0, rejected_weight=1.0)
    assert not rewards.requires_grad
    losses.sum().backward()
    # raising a desirable completion's log-prob lowers its loss; raising an undesirable one raises it
    assert policy.grad[0] < 0 < policy.grad[1]


def trl_kto(per_token_policy, reference, labels, policy_kl, reference_kl, *, beta, chosen_weight, rejected_weight):
    """TRL 1.16 KTOTrainer._compute_loss on a stand-in trainer and model: (loss, metrics)."""
    kto_trainer = pytest.importorskip("trl.trainer.kto_trainer")
    batch, width = per_token_policy.shape[0], per_token_policy.shape[1] + 1
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda tensor: tensor),
        beta=beta,
        desirable_weight=chosen_weight,
        undesirable_weight=rejected_weight,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,  # reference log-probs come from the batch, as in our cache
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        _compute_kl_logps=lambda model, batch: policy_kl,
    )
    outputs = SimpleNamespace(
        log_probs=per_token_policy, entropy=torch.zeros(batch, width - 1), mean_logits=torch.zeros(batch, width - 1)
    )
    inputs = {
        "input_ids": torch.zeros(batch, width, dtype=torch.long),
        "attention_mask": torch.ones(batch, width, dtype=torch.long),
        "completion_mask": torch.ones(batch, width, dtype=torch.long),
        "label": labels,
        "ref_logps": reference,
        "ref_KL_logps": reference_kl,
    }
    loss = kto_trainer.KTOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


KTO_CASES = [
    # (seed, labels, beta, chosen_weight, rejected_weight, KL shift: > 0 makes the clamp inactive)
    (0, [True, False, True, True, False, False, True, False], 0.1, 1.33, 0.7, 1.0),
    (1, [False, True, True, False, True, False, False], 0.5, 0.8, 1.25, -1.0),
    (2, [True, True, True, True], 0.1, 1.5, 0.6, 0.7),
    (3, [False, False, False, False, False], 0.3, 1.2, 0.9, 0.4),
    (4, [True], 0.1, 2.0, 0.5, 0.5),
]


@pytest.mark.parametrize("seed, labels, beta, chosen_weight, rejected_weight, kl_shift", KTO_CASES)
def test_kto_loss_equals_trl(seed, labels, beta, chosen_weight, rejected_weight, kl_shift):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    per_token_policy, per_token_reference = random_logps(generator, len(labels))
    policy_logps, reference_logps = per_token_policy.sum(-1), per_token_reference.sum(-1)
    kl_policy_tokens, kl_reference_tokens = random_logps(generator, len(labels))
    policy_kl, reference_kl = kl_policy_tokens.sum(-1) + kl_shift, kl_reference_tokens.sum(-1)

    z0 = kto_reference_point(policy_kl, reference_kl)
    weights = dict(beta=beta, chosen_weight=chosen_weight, rejected_weight=rejected_weight)
    losses, rewards = kto_loss(policy_logps, reference_logps, labels, z0, **weights)
    trl_loss, metrics = trl_kto(per_token_policy, reference_logps, labels, policy_kl, reference_kl, **weights)

    assert losses.shape == labels.shape
    assert abs(losses.mean().item() - trl_loss.item()) <= 1e-6
    assert abs(z0.item() - metrics["kl"][-1]) <= 1e-6
    for name, mask in (("rewards/chosen", labels), ("rewards/rejected", ~labels)):
        if mask.any():
            assert abs(rewards[mask].mean().item() - metrics[name][-1]) <= 1e-6, name
        else:
            assert name not in metrics


def test_kto_cases_exercise_both_sides_of_the_clamp():
    """Guard on the fixture above: some cases have z0 > 0 and some z0 clamped to 0."""
    reference_points = []
    for seed, labels, *_, kl_shift in KTO_CASES:
        generator = torch.Generator().manual_seed(seed)
        random_logps(generator, len(labels))
        policy_kl, reference_kl = random_logps(generator, len(labels))
        reference_points.append(kto_reference_point(policy_kl.sum(-1) + kl_shift, reference_kl.sum(-1)).item())
    assert 0.0 in reference_points and max(reference_points) > 0


# --------------------------------------------------------------------------------------------------
# KL partners


def test_kl_partners_derangement():
    for num_examples in range(2, 201):
        for seed in (0, 1, 12345):
            partners = kl_partners(num_examples, seed)
            assert sorted(partners) == list(range(num_examples))  # every completion used exactly once
            assert all(partner != example for example, partner in enumerate(partners))


def test_kl_partners_deterministic_per_seed():
    assert kl_partners(50, 7) == kl_partners(50, 7)
    drawn = {tuple(kl_partners(50, seed)) for seed in range(5)}
    assert len(drawn) == 5
    # each other example is a possible partner (not a fixed shift)
    assert {kl_partners(4, seed)[0] for seed in range(200)} == {1, 2, 3}


def test_kl_partners_needs_two_examples():
    for num_examples in (0, 1):
        with pytest.raises(ValueError, match="at least 2 examples"):
            kl_partners(num_examples, 0)


@pytest.mark.parametrize("num_examples", [7, 9, 13])
def test_kl_partners_every_micro_batch_gets_a_mismatched_pair(num_examples):
    partners = kl_partners(num_examples, seed=3)
    for micro_batch_size in range(1, 10):
        for start in range(0, num_examples, micro_batch_size):
            micro_batch = range(start, min(start + micro_batch_size, num_examples))
            for example in micro_batch:
                partner = partners[example]
                assert partner != example and 0 <= partner < num_examples


def test_kl_partners_scales_to_a_million_examples():
    start = time.perf_counter()
    partners = torch.tensor(kl_partners(1_000_000, 0))
    assert time.perf_counter() - start < 10  # O(n): ~1 s here
    examples = torch.arange(1_000_000)
    assert (partners != examples).all()
    assert torch.equal(partners.sort().values, examples)
