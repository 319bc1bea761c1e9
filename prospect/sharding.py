"""Sharded training: PyTorch's FSDP2 (`fsdp: full_shard`) or DeepSpeed ZeRO (`deepspeed: ds_z3_config.json`).

Under DDP every process holds the whole model, its gradients and its optimizer state. FSDP2
(`torch.distributed.fsdp.fully_shard`) splits each of them over the processes: one group per decoder
layer, gathered for that layer's forward and backward and freed after, and a root group for what is
left (embeddings, final norm, output head). The loop does not change: the root stays gathered from
its forward to the end of the backward, so the chunked log-probs read the output head's weight as
before; gradients are reduce-scattered in every backward; AdamW steps each process's slices.

DeepSpeed runs through Accelerate's integration: the JSON's "auto" values are filled from the YAML
(`deepspeed_settings`), its engine steps inside the backward of a step's last micro-batch (the
loop's clip / step calls are then no-ops that read the engine's norm), and under ZeRO-3 the output
head, partitioned outside module forwards, is gathered around the log-probs (`forward.sequence_logps`;
a trainable one by `forward.HeadLogps`), and full fine-tuning's frozen reference gets an engine of its
own (`partitioned_reference`).

What differs, and lives here:
- `check_sharding`: the combinations that cannot run where asked are refused (exit 2).
- `shard`: FSDP2's wrapping, for the policy and for full fine-tuning's frozen reference copy.
- every forward of a sharded model (FSDP2, ZeRO-3) is a collective, so each process must run as many
  as the others (`even_batches` pads the ones that have fewer with a batch whose results are dropped);
- checkpoints gather the full weights onto the main process (`gather_state`), so they are the usual
  PEFT / Hugging Face files that load without FSDP or DeepSpeed. FSDP2's optimizer state is gathered
  too, keyed by name, so its checkpoints resume on any number of processes, sharded or not
  (`load_state`); DeepSpeed's is the engine's own per-process files, resumed on as many processes.
"""

from __future__ import annotations

import json
from pathlib import Path
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


def deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON config that `deepspeed:` names, read and checked; UserError naming the file and key."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"deepspeed: {path}: no such file. Give the path of a DeepSpeed JSON config, e.g. LLaMA-Factory's "
                        "examples/deepspeed/ds_z3_config.json, or remove the key to train with DDP.")
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"deepspeed: {path} is not valid JSON ({error}).") from None
    if not isinstance(settings, dict):
        raise UserError(f"deepspeed: {path} must hold a JSON object ({{\"zero_optimization\": {{...}}, ...}}).")
    for section in ("optimizer", "scheduler"):
        if section in settings:
            raise UserError(f"{path}: \"{section}\": prospect builds AdamW and its learning-rate schedule from the YAML "
                            "(learning_rate, adam_*, weight_decay, lr_scheduler_type, warmup_*); remove the section.")
    zero = settings.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 1, 2 or 3 (it is "
                        f"{zero.get('stage', 0) if isinstance(zero, dict) else zero!r}); ZeRO-0 is DDP: remove the "
                        "deepspeed key for that.")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise UserError(f"{path}: zero_optimization.{key}.device must be none, cpu or nvme, not {device!r}.")
        if key == "offload_param" and device != "none" and zero["stage"] != 3:
            raise UserError(f"{path}: zero_optimization.offload_param needs stage 3 (weights are only partitioned "
                            "there); use offload_optimizer, or stage 3.")
    return settings


def zero_stage(settings: dict) -> int:
    return settings["zero_optimization"]["stage"]


def offloads(settings: dict) -> bool:
    zero = settings["zero_optimization"]
    return any((zero.get(key) or {}).get("device", "none") != "none" for key in ("offload_optimizer", "offload_param"))


def check_deepspeed_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("deepspeed: the deepspeed package is not installed: pip install 'prospect[deepspeed]' (a "
                        "pure-Python build; its CUDA ops compile on first use), or remove the key.")


def check_sharding(config, device: torch.device, world_size: int) -> None:
    """Refuse (exit 2) what cannot run as asked; called before anything is loaded."""
    if config.deepspeed:
        _check_deepspeed(config, device, world_size)
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


def _check_deepspeed(config, device, world_size: int) -> None:
    settings = deepspeed_json(config.deepspeed)
    check_deepspeed_installed()
    where = f"deepspeed: {config.deepspeed}"
    if config.fsdp:
        raise UserError(f"{where} and fsdp: {config.fsdp}: two sharding engines; keep one of the keys.")
    if offloads(settings) and device.type != "cuda":
        raise UserError(f"{where}: offload moves optimizer state or weights from GPU memory to CPU memory or NVMe; "
                        "this run is on CPU already: set zero_optimization.offload_*.device to none, or remove them.")
    if world_size < 2 and not offloads(settings):
        raise UserError(f"{where}: ZeRO partitions over processes, and this run has one: launch it with torchrun "
                        "--nproc_per_node N, or on Ray with ray_num_workers ≥ 2 (on one GPU, offload the optimizer "
                        "state or weights), or remove the key.")
    if config.quantization_bit:
        raise UserError(f"{where} with quantization_bit: ZeRO over 4/8-bit bitsandbytes weights is not built; use one "
                        "of them (QLoRA fits a model on one GPU that does not fit in 16 bits).")
    if config.torch_compile:
        raise UserError(f"{where} with torch_compile: not built together; set torch_compile: false.")


def deepspeed_settings(config, *, world_size: int, hidden_size: int) -> dict:
    """The DeepSpeed JSON with its "auto" values filled from the YAML, as the HF Trainer fills them; a
    value given in the JSON that differs from the YAML's is refused (which one would win is a guess)."""
    settings = deepspeed_json(config.deepspeed)
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world_size,
            "gradient_clipping": float(config.max_grad_norm or 0.0)}  # 0: DeepSpeed does not clip
    for key, value in ours.items():
        _fill(settings, key, value, config.deepspeed, yaml_key={"train_batch_size": "the global batch"}.get(key, key))
    for key, enabled in (("bf16", config.bf16), ("fp16", config.fp16)):
        section = settings.setdefault(key, {})
        _fill(section, "enabled", enabled, config.deepspeed, yaml_key=key, where=f"{key}.")
    zero = settings["zero_optimization"]
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),  # HF's formulas from the hidden size
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    left = [key for key, value in _flatten(settings) if value == "auto"]
    if left:
        raise UserError(f"{config.deepspeed}: prospect does not know what to put for the \"auto\" of {', '.join(left)}; "
                        "give a value.")
    settings.setdefault("steps_per_print", 2**31)  # the loop logs; DeepSpeed's own step lines would interleave
    settings["zero_allow_untested_optimizer"] = True  # torch's AdamW, built from the YAML
    if offloads(settings):
        settings["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the offloaded state on the CPU
    return settings


def _fill(section: dict, key: str, value, path: str, *, yaml_key: str, where: str = "") -> None:
    given = section.get(key, "auto")
    if given != "auto" and given != value:
        raise UserError(f"{path}: {where}{key} is {given!r}, but the YAML makes it {value!r} ({yaml_key}); set it to "
                        "\"auto\" (filled from the YAML), or change the YAML.")
    section[key] = value


def _flatten(settings: dict, prefix: str = ""):
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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
    """How many weights this process holds: all of them, or its slices of the sharded ones (FSDP2's
    resharded first: after a no-grad forward the root group stays gathered; ZeRO-3's partitions)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.ds_tensor.numel() if hasattr(p, "ds_tensor")
               else p.numel() for p in model.parameters())


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 or ZeRO-3: the weights are gathered in every forward, a collective."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or hasattr(next(model.parameters()), "ds_id")


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


def partitioned_reference(frozen: torch.nn.Module, settings: dict):
    """Full fine-tuning's frozen reference copy under ZeRO-3: partitioned like the policy, by an engine
    without an optimizer (its hooks gather each layer's weights for its forward; `engine.module` runs it)."""
    import deepspeed

    inference = {key: value for key, value in settings.items() if not key.startswith("zero_")}
    inference["zero_optimization"] = {key: value for key, value in settings["zero_optimization"].items()
                                      if key != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=frozen, config=inference)
    return engine


def gather_deepspeed_weights(model, *, keep: bool) -> dict:
    """The trainable weights' full float32 values (DeepSpeed's master copies: under bf16 the module's own
    are bfloat16), in CPU memory where `keep` (the main process: the others get an empty dict), one
    weight at a time; tied weights once. A collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = safe_get_full_fp32_param(parameter)  # every process takes part
            if keep:
                weights[name] = full.cpu()
    return weights


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
