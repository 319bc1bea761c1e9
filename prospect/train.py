"""`train(config)`: one function that trains, in a plain process, under torchrun, or in a Ray worker.

The path of a run, top to bottom (each arrow names the module that does it):

    config ─► tokenizer + encoded data (data.pipeline, cached) ─► model + LoRA (model) ─► optimizer
           ─► objective.prepare: KTO's reference log-probs, computed once, stored in output_dir (reference)
           ─► for each optimizer step: its examples, packed micro-batches (batching)
                 ─► objective.step: forward to log-probs (forward) ─► loss (losses) ─► backward
                 ─► clip, AdamW step ─► log (tracking) / objective.evaluate / checkpoint (checkpoints)
           ─► adapter (or weights), tokenizer, run_config.yaml, train_results.json, the objective's plots

What differs between objectives (SFT, KTO) lives in `prospect/objectives/`: the loop calls the run's
objective and has no branch per objective. The loop is ours; Accelerate provides the device, mixed
precision and the distributed plumbing (DDP's gradient all-reduce). Nothing here is process-global:
every piece of state is a local of `train`, so Ray can call it again in a restarted worker.

Choices worth knowing (the README's "Training" section says more):
- Batches are packed without padding (`prospect.packing`), and log-probs are computed from the final
  hidden states in chunks of tokens (`prospect.losses.token_logps`), never as full-vocabulary
  float32 logits.
- Every optimizer step is normalised over the whole step, across micro-batches and ranks: SFT by
  its number of trained tokens, KTO by its number of examples. So batch 8 × accumulation 1, batch 1 ×
  accumulation 8 and 2 ranks × batch 4 give the same update.
- KTO's reference point z0 is the mean over all KL pairs of the optimizer step (every micro-batch,
  every rank), computed by a no-grad pass of the policy before the step's backward passes; each
  example's KL partner is another example of the dataset (a fixed derangement), so a micro-batch of
  one still gets a mismatched pair. The reference model's log-probs for the targets and the KL pairs
  are computed once, before training, and reused by every epoch, by evaluation and by a resumed run.
- The data order is a function of (seed, epoch) only, so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from prospect import checkpoints
from prospect.batching import Examples, Schedule, examples_of_steps, plan_schedule, rank_micro_batches, step_examples
from prospect.config import RunConfig
from prospect.data.pipeline import prepare_data
from prospect.errors import UserError
from prospect.forward import HeadLogps, HiddenStates, Window, reduce_sums
from prospect.model import check_gpu_keys, load_tokenizer, load_trainable_model, model_folder
from prospect.objectives import objective_for
from prospect.packing import packed_attention_implementation
from prospect.reference import reference_model
from prospect.sharding import (check_sharding, deepspeed_settings, gather_deepspeed_weights, gather_state,
                               held_parameters, partitioned_reference, shard)

# What the loop adds to an objective's sums at every optimizer step.
LOOP_SUM_KEYS = ("grad_norm", "steps", "seconds", "tokens", "trained_tokens")


def train(config: RunConfig, *, on_checkpoint=None, on_reference_saved=None) -> dict:
    """Train as `config` says; return the contents of train_results.json.

    `on_checkpoint(step, folder, is_main)`, if given, runs on every rank once checkpoint-<step> is
    complete; `on_reference_saved(path)` on the main process each time the KTO reference file is
    saved (Ray workers use both to copy them to shared storage, see prospect/ray_launch.py)."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from prospect.tracking import Tracker

    if config.fp16 and not torch.cuda.is_available():
        raise UserError("fp16: true needs a CUDA GPU; on CPU train in float32 (bf16: false) or bf16: true.")
    # Accelerate keeps its settings in a process-wide singleton; a new run (a test, a restarted Ray
    # worker) must not inherit the last run's mixed precision, nor a DeepSpeed run's engine, which it
    # also writes into the process's state (that is then set up again, in the same process group).
    AcceleratorState._reset_state(reset_partial_state=PartialState._shared_state.get("distributed_type") == "DEEPSPEED")
    # cpu=True without CUDA: Accelerate joins a CPU (gloo) process group under torchrun only when told.
    # ddp_timeout: how long a collective waits under torchrun (Ray sets it on the group it creates).
    process_group = InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))
    accelerator = Accelerator(cpu=not torch.cuda.is_available() and not config.deepspeed,
                              mixed_precision="bf16" if config.bf16 else "fp16" if config.fp16 else "no",
                              deepspeed_plugin=_deepspeed_plugin(config, process_group), kwargs_handlers=[process_group])
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if config.deepspeed else None
    check_gpu_keys(config, accelerator.device)  # before anything is written or loaded
    check_sharding(config, accelerator.device, accelerator.num_processes)
    attention = packed_attention_implementation(config.flash_attn, accelerator.device,
                                                sixteen_bit=config.bf16 or config.fp16)
    output_dir = Path(config.output_dir)
    if main:
        checkpoints.prepare_output_dir(config.output_dir, overwrite=config.overwrite_output_dir,
                                       resume=config.resume_from_checkpoint)
        checkpoints.remove_stale_temporaries(config.output_dir)
    accelerator.wait_for_everyone()
    resume_from = checkpoints.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    set_seed(config.seed)

    # --- data ----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                               cache_dir=config.cache_dir)
    with accelerator.main_process_first():  # the main process tokenizes and caches; the others read
        data = prepare_data(config, tokenizer)
    train_set = Examples(data.train, stage=config.stage, cutoff_len=config.cutoff_len, seed=config.seed)
    eval_set = None
    if data.eval is not None and len(data.eval) > 0 and config.eval_strategy != "no":
        eval_set = Examples(data.eval, stage=config.stage, cutoff_len=config.cutoff_len, seed=config.seed + 1)
    objective = objective_for(config)
    if (line := objective.describe(train_set)) is not None:
        say(line)

    # --- model, optimizer, schedule ------------------------------------------------------------
    # DeepSpeed's engine moves the weights to the GPU itself, so the model is loaded into CPU memory; under
    # ZeRO-3 it is loaded partitioned (transformers' zero.Init: each process materialises its partitions).
    model_device = torch.device("cpu") if config.deepspeed else accelerator.device
    model = load_trainable_model(config, device=model_device, attn_implementation=attention)
    lora = config.finetuning_type == "lora"
    frozen_reference = None
    if objective.uses_reference_model and not lora and zero_stage == 3:  # a partitioned model is not copied:
        frozen_reference = HiddenStates(load_trainable_model(  # loaded again, partitioned by an engine below
            config, device=model_device, attn_implementation=attention).eval().requires_grad_(False))
    elif objective.uses_reference_model and not lora:
        frozen_reference = HiddenStates(copy.deepcopy(model).eval().requires_grad_(False))
        if config.deepspeed:  # DeepSpeed runs the policy in 16 bits where asked (no autocast)
            frozen_reference.to(accelerator.device, torch.bfloat16 if config.bf16 else
                                torch.float16 if config.fp16 else torch.float32)
    hidden_model = HiddenStates(model)
    head = hidden_model.causal_lm().get_output_embeddings()
    if zero_stage == 3 and not lora:  # a submodule before prepare, so that DeepSpeed hooks it
        hidden_model.head_logps = head = HeadLogps(head)
    elif zero_stage == 3 and any(p.requires_grad for p in head.parameters()):
        raise UserError(f"deepspeed: {config.deepspeed}: ZeRO-3 with an output head trained inside a LoRA run "
                        "(lora_target or the adapter's modules_to_save name lm_head) is not built; leave the head out "
                        "of the adapter, or use ZeRO-2, or fsdp: full_shard.")
    sharded = bool(config.fsdp)
    if sharded:  # in place, before the optimizer sees the parameters (they become sharded DTensors)
        shard(hidden_model, config)
        if frozen_reference is not None:
            shard(frozen_reference, config)
    if config.torch_compile and config.gradient_checkpointing:
        # Checkpointing runs its function with dynamo off, and a compiled checkpointed layer falls
        # back to eager at the graph break of packed attention: the flag would do nothing.
        say("warning: torch_compile is not applied with gradient_checkpointing (PyTorch runs checkpointed "
            "layers eagerly here); set one of them.")
    elif config.torch_compile:
        # Layer by layer, not the whole model: packed attention stays eager (torch.compiler.disable),
        # and a layer graph with dynamic lengths serves every step.
        for layer in hidden_model.causal_lm().get_decoder().layers:
            layer.compile(dynamic=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    schedule = plan_schedule(len(train_set), config, accelerator.num_processes, train_set.conversation_sizes)
    warmup = config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * schedule.total_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=schedule.total_steps)
    if sharded:  # Accelerate's own FSDP2 needs CUDA: it gives the sharded model autocast, and no DDP
        hidden_model, optimizer = accelerator.prepare_model(hidden_model, evaluation_mode=True), accelerator.prepare(optimizer)
    else:  # DeepSpeed: its engine, from the JSON with the "auto" values filled from this YAML
        if config.deepspeed:
            accelerator.state.deepspeed_plugin.deepspeed_config.update(deepspeed_settings(
                config, world_size=accelerator.num_processes, hidden_size=model.config.hidden_size))
        hidden_model, optimizer = accelerator.prepare(hidden_model, optimizer)
    reference_engine = None
    if frozen_reference is not None and zero_stage == 3:  # partitioned too, by an engine of its own
        reference_engine = partitioned_reference(frozen_reference, accelerator.state.deepspeed_plugin.deepspeed_config)
    total_weights = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())  # ZeRO-3: whole
    say(f"{len(train_set)} examples ({int(train_set.num_tokens.sum()):,} tokens), {schedule.total_steps} steps of "
        f"{schedule.global_batch_size} examples "
        f"({schedule.micro_batch_size} × {schedule.accumulation_steps} accumulation × {schedule.world_size} "
        f"processes), {sum(p.ds_numel if hasattr(p, 'ds_numel') else p.numel() for p in trainable):,} trainable "
        f"parameters, attention {attention}"
        + (f", sharded by FSDP2 ({config.fsdp})" if sharded else f", DeepSpeed ZeRO-{zero_stage}" if zero_stage else "")
        + (f": this process holds {held_parameters(hidden_model):,} of {total_weights:,} weights" if sharded or zero_stage
           else ""))

    # --- resume ----------------------------------------------------------------------------------
    start_step = 0
    data_fingerprint = objective.fingerprint(train_set)  # what a checkpoint must have been trained on
    if accelerator.num_processes > 1:  # the main process's: file times may differ between nodes' copies of a model
        from accelerate.utils import broadcast_object_list

        data_fingerprint = broadcast_object_list([data_fingerprint])[0]
    if resume_from is not None:
        state = checkpoints.read_state(resume_from)
        _check_resumable(state, schedule, config, resume_from, data_fingerprint, objective.fingerprint_note,
                         zero_stage)
        checkpoints.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                    rank=accelerator.process_index, lora=lora, sharded=sharded,
                                    engine=hidden_model if config.deepspeed else None)
        start_step = state["step"]
        say(f"resumed from {resume_from} at step {start_step}")
    elif config.resume_from_checkpoint:
        say(f"resume_from_checkpoint: no checkpoint in {output_dir} yet: starting at step 0")

    # --- what the objective needs first (KTO: reference log-probs of the steps to run and the eval split)
    reference_start = time.perf_counter()
    splits = {"train": (train_set, examples_of_steps(schedule, config.seed, start_step))}
    if eval_set is not None:
        splits["eval"] = (eval_set, list(range(len(eval_set))))
    reference_passes = objective.prepare(splits, lambda: reference_model(hidden_model, frozen_reference, accelerator),
                                         accelerator=accelerator, output_dir=output_dir, on_save=on_reference_saved)
    frozen_reference = None  # the frozen copy of full fine-tuning is not needed after this
    if reference_engine is not None:  # its hooks hold the copy in a reference cycle: removed, then collected
        reference_engine.destroy()
        reference_engine = None
        gc.collect()
    reference_seconds = time.perf_counter() - reference_start

    tracker = (Tracker(str(output_dir), config, resume_step=start_step if resume_from else None, plots=objective.PLOTS)
               if main else None)
    if main:
        (output_dir / "run_config.yaml").write_text(config.to_yaml())

    # A run that raises closes its trackers as failed (an MLflow run is not left RUNNING).
    with tracker if tracker is not None else contextlib.nullcontext():
        # --- the loop --------------------------------------------------------------------------------
        progress = tqdm(total=schedule.total_steps, initial=start_step, desc="train", disable=not main,
                        dynamic_ncols=True)
        window = Window(objective.SUM_KEYS + LOOP_SUM_KEYS)
        totals = {"tokens": 0, "trained_tokens": 0, "step_seconds": 0.0}
        eval_every = config.eval_steps or config.logging_steps
        loop_start = time.perf_counter()
        hidden_model.train()
        for step in range(start_step, schedule.total_steps):
            step_start = time.perf_counter()
            indices = step_examples(schedule, config.seed, step)
            micro_batches = rank_micro_batches(indices, schedule, accelerator.process_index)
            sums = objective.step(train_set, indices, micro_batches, hidden_model, head, accelerator)
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16: a step whose gradients overflowed was not taken
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            sums = reduce_sums(sums, accelerator)
            sums.update(grad_norm=float(grad_norm), steps=1, seconds=time.perf_counter() - step_start)
            window.add(sums)
            for key in ("tokens", "trained_tokens"):
                totals[key] += sums[key]
            totals["step_seconds"] += sums["seconds"]
            done = step + 1
            progress.update(1)
            if done % config.logging_steps == 0 or done == schedule.total_steps:
                metrics = objective.metrics(window.sums)
                metrics.update(
                    grad_norm=window.sums["grad_norm"] / window.sums["steps"],
                    learning_rate=scheduler.get_last_lr()[0],
                    tokens_per_second=window.sums["tokens"] / window.sums["seconds"],
                    epoch=done / schedule.steps_per_epoch,
                )
                if main:
                    tracker.log(done, metrics, split="train")
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                    progress.write(_metrics_line(done, schedule.total_steps, metrics))
                window = Window(objective.SUM_KEYS + LOOP_SUM_KEYS)
            if eval_set is not None and _is_eval_step(config, done, eval_every, schedule):
                metrics = objective.evaluate(eval_set, hidden_model, head, accelerator)
                if main:
                    tracker.log(done, metrics, split="eval")
                    progress.write(_metrics_line(done, schedule.total_steps, metrics, split="eval"))
                hidden_model.train()
            if done % config.save_steps == 0 or done == schedule.total_steps:
                _save_checkpoint(config, output_dir, done, schedule, hidden_model, model, optimizer, scheduler,
                                 accelerator, data_fingerprint, zero_stage)
                if on_checkpoint is not None:
                    on_checkpoint(done, output_dir / f"checkpoint-{done}", main)
        progress.close()

        # --- final outputs ---------------------------------------------------------------------------
        peak_memory_bytes = _peak_memory_bytes(accelerator.device)
        results = {
            "stage": config.stage,
            "num_examples": len(train_set),
            "num_steps": schedule.total_steps,
            "resumed_from_step": start_step,
            "epochs": schedule.total_steps / schedule.steps_per_epoch,
            "train_runtime_seconds": time.perf_counter() - loop_start,  # the loop, evaluation and saving included
            "num_tokens": totals["tokens"],
            "num_trained_tokens": totals["trained_tokens"],
            "tokens_per_second": totals["tokens"] / max(totals["step_seconds"], 1e-9),  # optimizer steps only
            "trained_tokens_per_second": totals["trained_tokens"] / max(totals["step_seconds"], 1e-9),
            "reference_forward_passes": reference_passes,
            "reference_seconds": reference_seconds,
            "peak_memory_bytes": peak_memory_bytes,
            "peak_memory_bytes_per_process": [int(peak) for peak in accelerator.gather(
                torch.tensor([peak_memory_bytes], device=accelerator.device)).tolist()],
            "world_size": accelerator.num_processes,
            "parameters_per_process": held_parameters(hidden_model),  # sharded: this process's slices
        }
        weights = (gather_state(model, optimizer, lora=lora, with_optimizer=False)[0] if sharded else
                   gather_deepspeed_weights(model, keep=main) if config.deepspeed else None)
        if main:
            model.save_pretrained(str(output_dir), state_dict=weights)
            tokenizer.save_pretrained(str(output_dir))
            tracker.finish(results)  # writes train_results.json and the plots
            say(f"saved to {output_dir}: {results['num_steps']} steps, "
                f"{results['tokens_per_second']:.0f} tokens/s, peak memory {results['peak_memory_bytes'] / 2**30:.2f} GiB")
    accelerator.wait_for_everyone()
    return results


def _is_eval_step(config: RunConfig, done: int, eval_every: int, schedule: Schedule) -> bool:
    if config.eval_strategy == "no":
        return False
    if done == schedule.total_steps:
        return True
    if config.eval_strategy == "epoch":
        return done % schedule.steps_per_epoch == 0
    return done % eval_every == 0


def _deepspeed_plugin(config: RunConfig, process_group):
    """Accelerate's DeepSpeed plugin for a `deepspeed:` run (its "auto" values are filled before prepare),
    else None. While it lives, transformers loads models partitioned under ZeRO-3 (zero.Init)."""
    import os

    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # the YAML decides (a previous run in this process set it)
    if not config.deepspeed:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # an earlier run's ZeRO-3 would make transformers load this model partitioned
        return None
    from accelerate import DeepSpeedPlugin
    from accelerate.state import PartialState

    from prospect.sharding import check_deepspeed_installed, deepspeed_json

    settings = deepspeed_json(config.deepspeed)
    check_deepspeed_installed()
    # A GGUF model (the embedded one) is converted and cached first: under the plugin's ZeRO-3 transformers
    # would load it partitioned, and the cache would get the partitions.
    model_folder(config.model_name_or_path, cache_dir=config.cache_dir)
    if not torch.cuda.is_available():
        # Accelerate turns DeepSpeed off under cpu=True, and without cpu=True a CPU process does not join
        # the process group (gloo): join it as cpu=True would, then ask for DeepSpeed on top.
        PartialState(cpu=True, **process_group.to_kwargs())
    elif "LOCAL_RANK" not in os.environ:
        # One GPU without a launcher (ZeRO with offload): DeepSpeed would look for MPI to find its process
        # group, and it reads the launcher's variables; give it a group of one and those variables.
        for key, value in (("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl", store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 **process_group.to_kwargs())
    return DeepSpeedPlugin(hf_ds_config=settings)


def _save_checkpoint(config, output_dir: Path, step: int, schedule: Schedule, hidden_model, model, optimizer,
                     scheduler, accelerator, data_fingerprint: str, zero_stage: int | None) -> None:
    folder = checkpoints.temporary_folder(str(output_dir), step)
    state = {
        "step": step,
        "data_fingerprint": data_fingerprint,
        "cutoff_len": config.cutoff_len,
        "epoch": step / schedule.steps_per_epoch,
        "seed": config.seed,
        "num_examples": schedule.num_examples,
        "global_batch_size": schedule.global_batch_size,
        "world_size": schedule.world_size,
        "total_steps": schedule.total_steps,
        "stage": config.stage,
        "deepspeed_zero_stage": zero_stage,
    }
    weights, optimizer_state = None, None  # DDP: the main process's own
    if config.fsdp:  # the full weights and optimizer state, gathered from every process (a collective)
        weights, optimizer_state = gather_state(model, optimizer, lora=config.finetuning_type == "lora")
    elif zero_stage:  # the weights gathered; the optimizer state in the engine's own files, one per process
        weights = gather_deepspeed_weights(model, keep=accelerator.is_main_process)
        hidden_model.save_checkpoint(str(folder / checkpoints.DEEPSPEED_FOLDER), tag=checkpoints.DEEPSPEED_TAG,
                                     exclude_frozen_parameters=config.finetuning_type == "lora")
    if accelerator.is_main_process:
        checkpoints.write_main_files(folder, model=model, optimizer=None if zero_stage else optimizer,
                                     scheduler=scheduler, state=state, weights=weights, optimizer_state=optimizer_state)
    accelerator.wait_for_everyone()
    checkpoints.write_rng_state(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.publish(folder, step, config.save_total_limit)
    accelerator.wait_for_everyone()


def _check_resumable(state: dict, schedule: Schedule, config: RunConfig, folder: Path, data_fingerprint: str,
                     fingerprint_note: str, zero_stage: int | None) -> None:
    """The data, its order and the schedule depend on these; resuming with other values would not
    continue the run (and KTO would mix reference log-probs of other sequences). DeepSpeed's optimizer
    state is its own per-process files: only the same ZeRO stage on as many processes reads them."""
    if "data_fingerprint" not in state:
        raise UserError(f"resume_from_checkpoint: {folder} was written by an earlier prospect, which did not record "
                        "the data it trained on; start a new run in another output_dir.")
    written = state.get("deepspeed_zero_stage")
    if (written or zero_stage) and (written, state.get("world_size")) != (zero_stage, schedule.world_size):
        by = f"DeepSpeed ZeRO-{written} on {state.get('world_size')} processes" if written else "a run without DeepSpeed"
        raise UserError(f"resume_from_checkpoint: {folder} was written by {by}; this run is "
                        + (f"ZeRO-{zero_stage} on {schedule.world_size} processes" if zero_stage else "without DeepSpeed")
                        + ". A DeepSpeed checkpoint's optimizer state resumes with the same ZeRO stage on as many "
                        "processes; resume it that way, or start a new run in another output_dir (its adapter or "
                        "weights load anywhere: adapter_name_or_path / model_name_or_path).")
    expected = {"seed": config.seed, "num_examples": schedule.num_examples,
                "global_batch_size": schedule.global_batch_size, "total_steps": schedule.total_steps,
                "stage": config.stage, "cutoff_len": config.cutoff_len}
    changed = [f"{key} {state.get(key)} → {value}" for key, value in expected.items() if state.get(key) != value]
    if state.get("data_fingerprint") != data_fingerprint:
        changed.append("the training data's tokens (data files, template, truncation or tokenizer)" + fingerprint_note)
    if changed:
        raise UserError(
            f"resume_from_checkpoint: {folder} was written by a run with other settings ({'; '.join(changed)}); "
            "resume with the original config, or start a new run in another output_dir."
        )


def _metrics_line(step: int, total: int, metrics: dict, split: str = "train") -> str:
    shown = [f"{key} {value:.4g}" for key, value in metrics.items() if key not in ("epoch",)]
    return f"{split} step {step}/{total} | " + " | ".join(shown)


def _peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
