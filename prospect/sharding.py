"""Sharded training with PyTorch's FSDP2 (`fsdp: full_shard`): each process holds a slice of every weight.

Under DDP every process holds the whole model, its gradients and its optimizer state. FSDP2
(`torch.distributed.fsdp.fully_shard`) splits each of them over the processes: one group per decoder
layer, gathered for that layer's forward and backward and freed after, and a root group for what is
left (embeddings, final norm, output head). The loop does not change: the root stays gathered from
its forward to the end of the backward, so the chunked log-probs read the output head's weight as
before; gradients are reduce-scattered in every backward; AdamW steps each process's slices.

What differs, and lives here:
- `check_sharding`: the combinations that cannot run where asked are refused (exit 2), and
  `deepspeed`, not built in yet, everywhere (`refuse_deepspeed`).
- `shard`: the wrapping, for the policy and for full fine-tuning's frozen reference copy.
- every forward of a sharded model is a collective, so each process must run as many as the others
  (`even_batches` pads the ones that have fewer with a batch whose results are dropped);
- checkpoints gather the full weights and optimizer state onto the main process (`gather_state`), so
  they are the usual PEFT / Hugging Face files that load without FSDP, and a checkpoint resumes on
  any number of processes, sharded or not (`load_state`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prospect.errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: `prospect train` imports this before torch
    import torch


def fsdp_options(value: str | None) -> list[str]:
    """The `fsdp` key's options, HF Trainer's spelling ("full_shard auto_wrap", "shard_grad_op offload");
    UserError for anything else (`RunConfig.validate` calls it)."""
    options = (value or "").replace(",", " ").split()
    if set(options) - {"full_shard", "shard_grad_op", "offload", "auto_wrap"} or (
            options and len({"full_shard", "shard_grad_op"} & set(options)) != 1):
        raise UserError(f"fsdp: {value!r} is not allowed: full_shard (weights, gradients and optimizer state "
                        "sharded) or shard_grad_op (gradients and optimizer state), optionally with offload "
                        "(CUDA) and auto_wrap (what prospect always does: a group per decoder layer).")
    return options


def refuse_deepspeed(config) -> None:
    """`deepspeed` is refused on every machine, by `prospect train` before anything starts (on Ray, before
    the workers), rather than accepted and ignored."""
    if config.deepspeed:
        raise UserError(f"deepspeed: {config.deepspeed}: DeepSpeed is not built into prospect yet (and it needs CUDA "
                        "GPUs). Shard with fsdp: full_shard instead (PyTorch FSDP2: ZeRO-3's scheme, on GPUs and "
                        "on CPU), or remove the key to train with DDP.")


def check_sharding(config, device: torch.device, world_size: int) -> None:
    """Refuse (exit 2) what cannot run as asked; called before anything is loaded."""
    refuse_deepspeed(config)
    if not config.fsdp:
        return
    options = fsdp_options(config.fsdp)
    if "offload" in options and device.type != "cuda":
        raise UserError("fsdp: offload moves the shards from GPU memory to CPU memory; this run is on CPU already, "
                        "so there is nothing to offload: remove offload.")
    if world_size < 2 and "offload" not in options:  # one GPU with offload: the weights live in CPU memory
        raise UserError("fsdp: shards the model over processes, and this run has one: launch it with torchrun "
                        "--nproc_per_node N, or on Ray with ray_num_workers ≥ 2 (or, on one GPU, add offload), or "
                        "remove the key.")
    if config.quantization_bit:
        raise UserError("fsdp with quantization_bit: sharding 4/8-bit bitsandbytes weights is not built; use "
                        "one of them (QLoRA fits a model on one GPU that does not fit in 16 bits).")
    if config.torch_compile:
        raise UserError("fsdp with torch_compile: not built together yet (compiled layers under FSDP2 are "
                        "untested); set torch_compile: false.")


def shard(hidden_model: torch.nn.Module, config) -> None:
    """fully_shard each decoder layer, then the root (`HiddenStates`: embeddings, final norm, head), in place.

    The root is not resharded after its forward (FSDP2 keeps the root gathered), which is what lets
    the log-probs read the head's weight after the forward; tied embeddings share that group."""
    import torch
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if not torch.distributed.is_initialized():  # one process (one GPU, offload): a group of one
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    options = fsdp_options(config.fsdp)
    offload = CPUOffloadPolicy() if "offload" in options else OffloadPolicy()
    reshard = "full_shard" in options  # shard_grad_op keeps a layer's weights gathered from forward to backward
    for layer in hidden_model.causal_lm().get_decoder().layers:
        fully_shard(layer, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(hidden_model, reshard_after_forward=False, offload_policy=offload)  # the head is read after forward


def held_parameters(model: torch.nn.Module) -> int:
    """How many weights this process holds: all of them, or its slices of the sharded ones (resharded
    first: after a no-grad forward the root group stays gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def even_batches(batches: list, filler, model: torch.nn.Module, accelerator) -> list[tuple[object, bool]]:
    """(batch, keep) pairs: this process's batches, then, for a sharded model, `filler` (keep False: its
    results are dropped) up to the most batches any process has. Every forward of a sharded model
    gathers weights from all processes, so all must run the same number."""
    import torch

    kept = [(batch, True) for batch in batches]
    if not is_sharded(model) or accelerator.num_processes == 1:
        return kept
    count = torch.tensor([len(batches)], device=accelerator.device)
    most = int(accelerator.reduce(count, "max"))
    return kept + [(filler, False)] * (most - len(batches))


def gather_state(model, optimizer, *, lora: bool, with_optimizer: bool = True) -> tuple[dict, dict | None]:
    """The full (unsharded) weights — LoRA: the trainable adapter weights only — and the optimizer state,
    keyed by parameter name, on the main process (the others get empty dicts). A collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    weights = get_model_state_dict(model, options=options)
    seen = set()
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied weights: saved once, as
        if id(parameter) in seen:                                           # save_pretrained does
            weights.pop(name, None)
        seen.add(id(parameter))
    state = get_optimizer_state_dict(model, optimizer, options=options) if with_optimizer else None
    return weights, state


def load_state(model, optimizer, weights: dict, optimizer_state: dict, *, sharded: bool) -> None:
    """Load full weights and a name-keyed optimizer state (`gather_state`'s) into a model, sharded or not.
    Sharded: the main process passes the dicts, the others empty ones, and the main process's are
    broadcast and sliced onto every process. A collective when sharded."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=sharded, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def state_by_name(optimizer_state: dict, names: list[str]) -> dict:
    """A `torch.optim` state dict keyed by parameter number, keyed by parameter name instead (`names[i]`
    is parameter i), the form `load_state` takes: so an unsharded run's checkpoint resumes sharded."""
    return {"state": {names[number]: value for number, value in optimizer_state["state"].items()},
            "param_groups": [{**group, "params": [names[number] for number in group["params"]]}
                             for group in optimizer_state["param_groups"]]}
