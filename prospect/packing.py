"""Padding-free batches: the sequences of a micro-batch laid end to end in one row.

A micro-batch of B sequences becomes one row of T = Σ len_i tokens, with position ids restarting at
0 for each sequence and `cu_seq_lens` = [0, len_0, len_0 + len_1, ..., T] marking where they start.
No padding token is ever computed, whatever the spread of lengths, so the cost of a step is the cost
of its real tokens (a padded batch of lengths 50 and 500 computes 1000 tokens; packed, 550).

Attention must keep the sequences apart. Four backends do:
- `flash_attention_2` (GPU, when the `flash-attn` package is installed) reads `cu_seq_lens_q/k` and
  runs its variable-length kernel;
- `prospect_varlen` (GPU, `flash_attn: fa2` without that package): the same kernel as PyTorch ships
  it (`torch.nn.attention.varlen`), all sequences in one call, registered below;
- `prospect_packed` (everywhere else), registered below: PyTorch's scaled-dot-product attention run
  causally on each sequence's slice. Its cost is Σ len_i², as with padding-free kernels, where a
  block-diagonal mask over the whole row would cost T².
- `prospect_packed_eager` (`flash_attn: disabled`): the same slices through the model's own eager
  attention code (explicit softmax(QKᵀ)V, as transformers' `eager`), for models or debugging sessions
  that need exactly that.
All read the same keyword arguments, which transformers passes from `model(...)` down to the
attention function of every layer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prospect.data.encode import IGNORE_INDEX

PACKED_ATTENTION = "prospect_packed"
PACKED_EAGER_ATTENTION = "prospect_packed_eager"
VARLEN_ATTENTION = "prospect_varlen"
PACKED_ATTENTIONS = (PACKED_ATTENTION, PACKED_EAGER_ATTENTION, VARLEN_ATTENTION)  # the ones that read a PromptCache


@dataclass
class PackedBatch:
    """B examples packed into one row of T tokens.

    `targets[t]` is the token that position t must predict (the next token of the same sequence) or
    IGNORE_INDEX where nothing is trained; its log-prob counts towards example `example_index[t]`.
    Usually each example is a sequence of its own. KTO's rated turns of one conversation share one:
    an earlier turn's example is a prefix of the later one's, so its targets ride in the later
    sequence (causal attention gives them the same log-probs) and the conversation is computed once.
    `example_starts[b]` is where example b's tokens start in the row.
    """

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 for each sequence
    targets: torch.Tensor  # [T] long
    example_index: torch.Tensor  # [T] long, in [0, B)
    cu_seq_lens: torch.Tensor  # [S + 1] int32, S ≤ B sequences
    max_length: int
    num_examples: int
    example_starts: list[int]  # [B]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_trained_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
            self.example_index.to(device), self.cu_seq_lens.to(device), self.max_length, self.num_examples,
            self.example_starts,
        )

    def model_inputs(self) -> dict:
        """Keyword arguments for `model(...)`: the ids, the positions and the sequence bounds that
        both packed attention backends read."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seq_lens,
            "cu_seq_lens_k": self.cu_seq_lens,
            "max_length_q": self.max_length,
            "max_length_k": self.max_length,
            "use_cache": False,
        }


def pack(sequences: list[tuple[list[int], list[int]]], hosts: list[int] | None = None) -> PackedBatch:
    """Pack (input_ids, labels) pairs, labels aligned with input_ids (labels[t] = input_ids[t] where
    trained, IGNORE_INDEX elsewhere), as `prospect.data.encode` produces them.

    `hosts[b]` (default: b) is the example whose sequence example b's targets ride in: b itself, or
    an example whose ids start with b's and whose own targets are elsewhere (`shared_hosts`)."""
    assert sequences, "a packed batch needs at least one sequence"
    hosts = list(range(len(sequences))) if hosts is None else hosts
    input_ids, positions, targets, example_index, bounds = [], [], [], [], [0]
    starts = {}
    for index, (ids, labels) in enumerate(sequences):
        assert len(ids) == len(labels) and ids, "each sequence needs as many labels as ids, and at least one token"
        if hosts[index] != index:
            continue
        starts[index] = bounds[-1]
        input_ids += ids
        positions += range(len(ids))
        targets += labels[1:] + [IGNORE_INDEX]  # position t predicts token t+1 of its own sequence
        example_index += [index] * len(ids)
        bounds.append(bounds[-1] + len(ids))
    for index, (ids, labels) in enumerate(sequences):
        host = hosts[index]
        if host == index:
            continue
        start = starts[host]
        assert list(sequences[host][0][: len(ids)]) == list(ids), f"example {index} must be a prefix of its host {host}"
        for t, label in enumerate(labels[1:]):
            if label != IGNORE_INDEX:
                assert targets[start + t] == IGNORE_INDEX, f"example {index}'s targets must not overlap its host's"
                targets[start + t], example_index[start + t] = label, index
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return PackedBatch(
        input_ids=torch.tensor([input_ids]),
        position_ids=torch.tensor([positions]),
        targets=torch.tensor(targets),
        example_index=torch.tensor(example_index),
        cu_seq_lens=torch.tensor(bounds, dtype=torch.int32),
        max_length=max(lengths),
        num_examples=len(sequences),
        example_starts=[starts[hosts[b]] for b in range(len(sequences))],
    )


def shared_hosts(sequences: list[tuple[list[int], list[int]]], conversations: list) -> list[int]:
    """For `pack`: the sequence each example's targets ride in. An example rides in another of the same
    conversation when its ids are a prefix of the other's and none of its targets falls on a target
    already placed there (a rated earlier turn is part of a later turn's prompt); otherwise it is a
    sequence of its own. Longer sequences host first, so a conversation's rated turns share its last
    one's sequence."""
    hosts = list(range(len(sequences)))
    claimed: dict[int, set[int]] = {}  # host -> its target positions taken so far
    by_length = sorted(range(len(sequences)), key=lambda b: -len(sequences[b][0]))
    for b in by_length:
        ids, labels = sequences[b]
        mine = {t for t, label in enumerate(labels[1:]) if label != IGNORE_INDEX}
        for host in claimed:
            host_ids = sequences[host][0]
            if (conversations[host] == conversations[b] and len(host_ids) >= len(ids)
                    and not (mine & claimed[host]) and list(host_ids[: len(ids)]) == list(ids)):
                hosts[b] = host
                claimed[host] |= mine
                break
        else:
            claimed[b] = mine
    return hosts


class PromptCache:
    """The keys and values of each example's prompt prefix (`prefixes[b]`: its start in the packed row and
    its length), per layer: captured by one forward of packed sequences, read by a second forward that
    continues those prefixes.

    KTO's KL pair i is example i's prompt followed by another example's completion. The policy's
    forward over the targets (prompt_i + completion_i) captures the prompts' keys and values
    (a new cache captures); after `extend()` the KL pass runs only the partners' completions, each
    attending to its prompt's cached keys and values, so no prompt is computed twice. Pass it to the
    model as `prompt_cache=` (transformers hands keyword arguments down to the attention function);
    only prospect's packed attentions (`PACKED_ATTENTIONS`) read it. After `release()` the attention
    ignores it (e.g. when gradient checkpointing recomputes the capturing forward during backward).
    """

    def __init__(self, prefixes: list[tuple[int, int]]):
        self.prefixes = list(prefixes)  # (start in the packed row, length) of each example's prompt prefix
        self.mode = "capture"  # read by the attention: capture, extend or off
        self.layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def extend(self) -> None:
        """From capturing (the forward over prompt + completion) to extending (the continuations' pass)."""
        assert self.mode == "capture", f"extend() follows the capturing forward, not mode {self.mode!r}"
        self.mode = "extend"

    def release(self) -> None:
        """Ignored from now on by the attention, and its keys and values freed."""
        self.mode, self.layers = "off", {}


@torch.compiler.disable  # per-sequence bounds and the prompt cache are Python data: eager, not recompiled per batch
def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention within each packed sequence (query/key/value: [1, heads, T, head_dim]), by
    PyTorch's scaled-dot-product attention. Returns [1, T, heads, head_dim], the layout transformers'
    attention functions return."""
    return _packed_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs, eager=False)


@torch.compiler.disable
def packed_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`packed_sdpa_attention` computed by the model's own eager attention function, slice by slice."""
    return _packed_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs, eager=True)


@torch.compiler.disable
def packed_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """`packed_sdpa_attention` with every sequence in one call of flash attention's variable-length
    kernel as PyTorch ships it (`torch.nn.attention.varlen`, CUDA, 16-bit), where it applies."""
    return _packed_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs, eager=False,
                             varlen=True)


def _packed_attention(module, query, key, value, attention_mask, dropout, scaling, kwargs, *, eager: bool,
                      varlen: bool = False):
    assert attention_mask is None, "packed attention takes sequence bounds (cu_seq_lens_q), not a mask"
    cache = kwargs.get("prompt_cache")
    mode = cache.mode if cache is not None else "off"
    if mode == "extend":
        bounds = kwargs["cu_seq_lens_q"].tolist()
        return _extend_attention(module, cache, query, key, value, bounds, dropout, scaling, eager), None
    use_varlen = varlen and not dropout and query.dtype in (torch.bfloat16, torch.float16)
    # The bounds as Python numbers cost a device sync per layer: the one-call kernel does without them.
    bounds = None if use_varlen else kwargs["cu_seq_lens_q"].tolist()
    if use_varlen:
        output = _varlen(query, key, value, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], scaling)
    else:
        outputs = [
            _attend(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, dropout,
                    scaling, eager)
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
        output = torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
    if mode == "capture":
        cache.layers[module.layer_idx] = [
            (key[:, :, start : start + n].detach(), value[:, :, start : start + n].detach())
            for start, n in cache.prefixes
        ]
    return output, None


def _varlen(query, key, value, cu_seq_lens, max_length, scaling) -> torch.Tensor:
    """Causal attention of all packed sequences in one kernel call: [1, heads, T, d] in, [1, T, heads, d] out."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [T, heads, d]
    if k.shape[1] != q.shape[1]:  # grouped-query attention (torch 2.11's varlen_attn has no enable_gqa)
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    length = int(max_length)
    # window (-1, 0): every earlier key, no later one, i.e. causal (its signature in torch 2.11 and 2.13)
    return varlen_attn(q, k, v, cu, cu, length, length, scale=scaling, window_size=(-1, 0)).unsqueeze(0)


def _attend(module, query, key, value, visible, dropout, scaling, eager: bool) -> torch.Tensor:
    """One sequence's attention: queries [1, heads, q, d] over keys/values [1, kv_heads, k, d], causal
    when `visible` is None, else where the bool mask [q, k] allows. Returns [1, heads, q, d]."""
    grouped = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads
    if not eager:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=visible, dropout_p=dropout,
                                              is_causal=visible is None, scale=scaling, enable_gqa=grouped)
    if visible is None:
        visible = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    mask = mask.masked_fill(~visible, torch.finfo(query.dtype).min)[None, None]
    # The modeling file's own eager attention (it applies what the model adds, e.g. soft-capping);
    # every transformers decoder defines one.
    eager_attention = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    assert eager_attention is not None, f"{type(module).__name__}'s module defines no eager_attention_forward"
    output, _ = eager_attention(module, query, key, value, mask, scaling=scaling, dropout=dropout)
    return output.transpose(1, 2)  # eager functions return [1, q, heads, d]


def _extend_attention(module, cache, query, key, value, bounds, dropout, scaling, eager):
    """Each packed sequence continues cached prefix i: its queries see the prefix and, causally, itself."""
    prefixes = cache.layers[module.layer_idx]
    assert len(prefixes) == len(bounds) - 1, "a prompt cache continues exactly the sequences it captured"
    outputs = []
    for (start, end), (prefix_key, prefix_value) in zip(zip(bounds[:-1], bounds[1:]), prefixes):
        length, prefix = end - start, prefix_key.shape[2]
        # query t (at position prefix + t) sees keys 0 .. prefix + t: causal, aligned bottom-right
        visible = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device).tril(prefix)
        outputs.append(_attend(module, query[:, :, start:end], torch.cat([prefix_key, key[:, :, start:end]], dim=2),
                               torch.cat([prefix_value, value[:, :, start:end]], dim=2), visible, dropout, scaling,
                               eager))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()


def register_packed_attention() -> None:
    """Make `prospect_packed` and `prospect_packed_eager` valid `attn_implementation`s (idempotent). With
    no mask function registered under those names, transformers builds no attention mask for them,
    which is the point."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionInterface.register(PACKED_EAGER_ATTENTION, packed_eager_attention)
    AttentionInterface.register(VARLEN_ATTENTION, packed_varlen_attention)


def packed_attention_implementation(flash_attn: str, device: torch.device, sixteen_bit: bool = True) -> str:
    """The attention backend for packed batches.

    `flash_attn` is the config key: auto | fa2 | sdpa | disabled. fa2 is flash-attention 2's
    variable-length kernel over all packed sequences at once: the flash-attn package's (transformers'
    `flash_attention_2`, which reads `cu_seq_lens_q/k`) where it is installed, else the one PyTorch
    ships (`torch.nn.attention.varlen`, `prospect_varlen`; not yet run on a GPU, so only fa2 asks for
    it). It needs CUDA and 16-bit activations (`sixteen_bit`: bf16 or fp16); asking for it where it
    cannot run is an error. auto takes the flash-attn package where it can run, else
    `prospect_packed` (SDPA per sequence, which on CUDA dispatches to PyTorch's own flash /
    memory-efficient kernels); disabled is the model's eager attention per packed sequence. (The KL
    pass that continues cached prompts runs SDPA per sequence in every backend.)
    """
    import importlib.util

    from prospect.errors import UserError

    cuda = device.type == "cuda"
    has_package = cuda and importlib.util.find_spec("flash_attn") is not None
    has_torch_varlen = cuda and importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if flash_attn in ("auto", "fa2") and sixteen_bit and has_package:
        return "flash_attention_2"
    register_packed_attention()
    if flash_attn == "fa2" and sixteen_bit and has_torch_varlen:
        return VARLEN_ATTENTION
    if flash_attn == "fa2":
        why = ("this run has no CUDA device (flash-attention is a CUDA kernel)" if not cuda
               else "it computes in 16 bits: set bf16: true (or fp16: true)" if not sixteen_bit
               else "neither the flash-attn package (pip install flash-attn --no-build-isolation) nor a PyTorch "
                    "with torch.nn.attention.varlen is installed")
        raise UserError(f"flash_attn: fa2: {why}. Use flash_attn: auto (fa2 where it can run, else PyTorch SDPA) "
                        "or sdpa.")
    return PACKED_EAGER_ATTENTION if flash_attn == "disabled" else PACKED_ATTENTION
