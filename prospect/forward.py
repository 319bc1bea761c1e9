"""The model's forward pass up to log-probs, and the sums that metrics are made of.

`HiddenStates` runs the causal LM without its output head; `sequence_logps` turns the final hidden
states into per-token and per-sequence log-probs in chunks (`losses.token_logps`), so the [T, V]
float32 logits never exist. An objective's step returns sums (of losses, rewards, tokens …);
`reduce_sums` adds them over ranks and a `Window` over the steps of one logging window.
"""

from __future__ import annotations

import contextlib

import torch

from prospect.losses import token_logps
from prospect.packing import PackedBatch, PromptCache


class HiddenStates(torch.nn.Module):
    """The causal LM without its output head: returns the final hidden states [T, H] of a packed row.

    Log-probs are then computed from them in chunks (`token_logps`), so the [T, V] float32 logits
    never exist. Wrapping the model in this module (rather than calling its decoder from outside)
    keeps the forward inside what Accelerate prepares (DDP, autocast)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, **inputs) -> torch.Tensor:
        # With `torch_compile`, only the training forward runs compiled: each no-grad pass (KL, reference
        # with LoRA off, eval) would compile graphs of its own, minutes on CPU for a small share of the time.
        stance = contextlib.nullcontext() if torch.is_grad_enabled() else torch.compiler.set_stance("force_eager")
        with stance:
            return self.causal_lm().get_decoder()(**inputs).last_hidden_state[0]


def sequence_logps(hidden_model, head, batch: PackedBatch, device, prompt_cache: PromptCache | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example summed log-probs of the targets [B], per-token log-probs [T]), float32."""
    batch = batch.to(device)
    extra = {} if prompt_cache is None else {"prompt_cache": prompt_cache}
    hidden = hidden_model(**batch.model_inputs(), **extra)
    if isinstance(head, HeadLogps):
        per_token = head(hidden, batch.targets)
    else:
        with _gathered(head):
            per_token = token_logps(hidden, head, batch.targets)
    per_example = torch.zeros(batch.num_examples, dtype=torch.float32, device=device)
    return per_example.index_add(0, batch.example_index, per_token), per_token


def reduce_sums(values: dict, accelerator) -> dict:
    """Sum a dict of numbers over ranks with one all-reduce."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    tensor = accelerator.reduce(tensor, "sum")
    return dict(zip(keys, tensor.tolist()))


class HeadLogps(torch.nn.Module):
    """`token_logps` as a module, for a trainable output head under ZeRO-3 (full fine-tuning).

    ZeRO-3 keeps a weight partitioned outside the forward and backward of its module, and the log-probs
    read the head's weight outside it. Registered as this module's external parameter, it is gathered
    once for this module's forward and once for its backward (which recomputes the chunks), and its
    gradient is reduced as any weight's. The head stays the model's: it is not a submodule here."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.__dict__["head"] = head  # not registered: its parameters stay where the model has them
        import deepspeed

        for parameter in head.parameters():
            deepspeed.zero.register_external_parameter(self, parameter)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_logps(hidden, self.head, targets)


def _gathered(head):
    """ZeRO-3 keeps a weight partitioned outside its module's forward, and the log-probs read the head's
    weight outside it: gather it for them (a collective: every process runs as many). A frozen head
    (LoRA, a frozen reference) gets here: its log-probs' backward needs no weight
    (`losses._FrozenLinearLogps`); a trainable one goes through `HeadLogps`."""
    if not hasattr(head.weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None)


def sync_unless_last(accelerator, model, number: int, count: int):
    """DDP all-reduces gradients in every backward; skip it for all but the step's last micro-batch.
    DeepSpeed's engine steps in the backward of the micro-batch that syncs (then its reduction is done)."""
    if accelerator.distributed_type == "DEEPSPEED":
        accelerator.gradient_state._set_sync_gradients(number == count - 1)  # what `accelerator.accumulate` sets
        return contextlib.nullcontext()
    return contextlib.nullcontext() if number == count - 1 else accelerator.no_sync(model)


def backward(accelerator, loss: torch.Tensor) -> None:
    """`accelerator.backward`; DeepSpeed would divide the loss by the accumulation steps again (the
    objectives normalise over the whole step already), so it is told not to, as the HF Trainer does."""
    accelerator.backward(loss, **({"scale_wrt_gas": False} if accelerator.distributed_type == "DEEPSPEED" else {}))


class Window:
    """Sums of one logging window (or one evaluation). Every rank starts from the same keys (the
    objective's and the loop's), so `reduce_sums` adds like with like."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.sums = dict.fromkeys(keys, 0.0)

    def add(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)
