"""`prospect train` on a Ray cluster: Ray Train launches and supervises, `train(config)` trains.

USE_RAY=1, or `ray_num_workers > 1`, sends a run here (prospect/launch.py). The driver (this process):

1. checks what can be checked before any worker starts (GPU-only options on CPU workers, resources
   the cluster can never provide), so those mistakes are a short message and exit code 2;
2. connects to the cluster named by `ray_address` / $RAY_ADDRESS, or starts a local one sized to
   this machine, passing `ray_init_kwargs` to `ray.init`;
3. decides whether the run folder `ray_storage_path/ray_run_name/` is continued or replaced (below);
4. runs a Ray Train `TorchTrainer`: `ray_num_workers` workers, each holding `resources_per_worker`,
   placed by `placement_strategy`, wired into one torch.distributed group (gloo on CPU, NCCL on GPU).

Each worker runs `train_loop_per_worker` (prospect/ray_worker.py), which calls the same `train(config)` as a plain run.
Accelerate reads the rank and world size that Ray Train sets (RANK, WORLD_SIZE, MASTER_ADDR, ...),
so sharding, gradient all-reduce and metric reduction are the ones of a torchrun run.

Storage layout (Ray Train's own; `ray_storage_path` is a local path or any URI pyarrow reads):

    <ray_storage_path>/<ray_run_name>/
        checkpoint-<step>/                  every checkpoint, complete: adapter (or weights),
                                            optimizer.pt, scheduler.pt, rng_state_<rank>.pt,
                                            trainer_state.json (step, data position, file list),
                                            plus metrics.jsonl and (KTO) reference_logps.safetensors
        checkpoint_manager_snapshot.json    Ray's list of registered (complete) checkpoints
        adapter_model.safetensors, adapter_config.json, tokenizer files, run_config.yaml,
        metrics.jsonl, train_results.json, training_*.png     the final outputs, copied at the end
        reference_logps.safetensors         KTO: the reference log-probs, copied each time train() saves
                                            them, so a worker group restarted before the first
                                            checkpoint continues the reference pass

`output_dir` is the rank-0 worker's local working folder: train() writes there as usual, each
checkpoint is handed to Ray Train (which copies it into the run folder and only then registers it)
and the local copy is deleted; at the end rank 0 copies its outputs into the run folder.

Resume rule. Ray Train continues a run whose folder holds registered checkpoints: after a worker
dies (up to `ray_max_failures` times) the worker group restarts from the latest one, and re-running
the same command after the driver was killed does the same. Here that is allowed only when the run
folder's run_config.yaml has the same training settings (keys that change the weights; the global
batch size rather than its factors). Otherwise `overwrite_output_dir: true` replaces the run folder
and starts over, and without it the run stops with a message. To train the same config again from
scratch, choose a new `ray_run_name` (its default is the name of `output_dir`).

A checkpoint is registered by Ray only after every worker's copy has finished, so one half-written
by a crash (in output_dir or in storage) is never handed back by `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from prospect.config import RunConfig
from prospect.allocator import ALLOCATOR_ENV
from prospect.errors import UserError
from prospect.ray_worker import RUN_CONFIG_FILE, RunFolder, train_loop_per_worker


# Keys that do not change the weights a run produces: a re-run may change them and still resume.
# per_device_train_batch_size × gradient_accumulation_steps × ray_num_workers is compared as one number.
NOT_TRAINING_KEYS = {
    "output_dir", "overwrite_output_dir", "logging_steps", "save_steps", "save_total_limit", "plot_loss",
    "report_to", "resume_from_checkpoint", "overwrite_cache", "preprocessing_num_workers", "cache_dir",
    "on_bad_record", "do_train", "do_eval", "eval_strategy", "eval_steps", "eval_dataset", "eval_pattern",
    "per_device_eval_batch_size", "ddp_timeout", "flash_attn", "enable_liger_kernel", "torch_compile",
    "gradient_checkpointing", "trust_remote_code", "per_device_train_batch_size", "gradient_accumulation_steps",
    "ray_run_name", "ray_storage_path", "ray_num_workers", "resources_per_worker", "placement_strategy",
    "ray_init_kwargs", "ray_address", "ray_max_failures",
    "export_dir", "export_size", "export_dtype", "export_overwrite", "infer_backend", "infer_dtype",
    "max_new_tokens", "temperature", "top_p", "host", "port", "api_key", "serve_batch_size",
}


# --------------------------------------------------------------------------------------------------
# The driver


def launch_on_ray(config: RunConfig, *, train_loop=None) -> dict:
    """Train `config` on Ray; return train_results.json's contents (from the rank-0 worker).

    `train_loop` is the function each worker runs, `train_loop_per_worker` by default; a replacement
    must end by calling it (tests wrap it to kill a worker at a chosen step)."""
    # Ray Train polls its controller through the State API, which needs the full dashboard
    # (ray[default]); without it a harmless warning repeats every few seconds. Read at `import ray`.
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "State API may be temporarily unavailable")
    use_gpu = float(config.resources_per_worker.get("GPU", 0)) > 0
    _check_gpu_only_options(config, use_gpu)
    env_vars = _runtime_env_vars(config)
    # Ray Train 2.x tees each worker's print() into its logger, so every line would show twice.
    worker_env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                  **{name: os.environ.get(name, value) for name, value in ALLOCATOR_ENV.items()}, **env_vars}
    config = _resolved(config)
    storage = RunFolder(config.ray_storage_path, config.ray_run_name)

    with _ray_connection(config, env_vars) as started_here:
        _check_resources(config, use_gpu, started_here)
        try:
            _decide_resume(config, storage)
            storage.write_text(RUN_CONFIG_FILE, config.to_yaml())
        except OSError as error:  # pyarrow: permission denied, bucket missing, no credentials, ...
            raise UserError(f"ray_storage_path: cannot use {storage.uri}: {error}") from None
        from ray.train import TrainingFailedError

        trainer = _make_trainer(config, use_gpu, worker_env, train_loop or train_loop_per_worker)
        try:
            result = trainer.fit()
        except TrainingFailedError as error:  # the workers' own error, said plainly
            raise _plain_error(error) from None
    print(f"run folder: {storage.uri} (checkpoints, final adapter, metrics.jsonl, plots)")
    return result.return_value or {}


def _check_gpu_only_options(config: RunConfig, use_gpu: bool) -> None:
    """Options that need GPU workers, refused before Ray starts anything (train() would also refuse
    them, but only after the workers started, and once per retry)."""
    if use_gpu:
        return
    fsdp = str(_runtime_env_vars(config).get("ACCELERATE_USE_FSDP", os.environ.get("ACCELERATE_USE_FSDP", ""))).lower()
    wanted = [
        (fsdp in ("1", "true", "yes"), "ACCELERATE_USE_FSDP shards the model across GPUs"),
        (config.fp16, "fp16: true needs CUDA"),
        (config.enable_liger_kernel, "enable_liger_kernel: true needs CUDA (liger's kernels are Triton GPU kernels)"),
        (config.flash_attn == "fa2", "flash_attn: fa2 needs CUDA"),
    ]
    reasons = [reason for present, reason in wanted if present]
    if reasons:
        raise UserError(
            f"{'; '.join(reasons)}, but the Ray workers are CPU workers (resources_per_worker has no GPU). "
            "Set resources_per_worker: {GPU: 1} on a GPU cluster, or remove the option to train on CPU."
        )


def _runtime_env_vars(config: RunConfig) -> dict[str, str]:
    runtime_env = config.ray_init_kwargs.get("runtime_env") or {}
    if not isinstance(runtime_env, dict) or not isinstance(runtime_env.get("env_vars") or {}, dict):
        raise UserError("ray_init_kwargs: runtime_env must be a mapping, and its env_vars a mapping of NAME: value.")
    return {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}


def _resolved(config: RunConfig) -> RunConfig:
    """Paths every worker can use whatever its working folder (Ray Train moves workers into a session
    folder), and the run name."""
    storage = config.ray_storage_path
    if "://" not in storage:
        storage = os.path.abspath(os.path.expanduser(storage))
    output_dir = os.path.abspath(os.path.expanduser(config.output_dir))
    name = config.ray_run_name or Path(output_dir).name
    if not name or "/" in name:
        raise UserError(f"ray_run_name: {name!r} is not allowed: use a plain folder name.")
    cache_dir = os.path.abspath(os.path.expanduser(config.cache_dir)) if config.cache_dir else None
    resume = config.resume_from_checkpoint
    if resume not in (None, "true") and "://" not in resume:
        resume = os.path.abspath(os.path.expanduser(resume))
    return dataclasses.replace(config, ray_storage_path=storage, output_dir=output_dir, ray_run_name=name,
                               cache_dir=cache_dir, resume_from_checkpoint=resume)


@contextlib.contextmanager
def _ray_connection(config: RunConfig, env_vars: dict[str, str]):
    """Connect to the cluster at ray_address / $RAY_ADDRESS, or start a local one; yields whether
    the cluster was started here. A Ray session this process already had is used as it is."""
    import ray

    if ray.is_initialized():
        yield False
        return
    kwargs = dict(config.ray_init_kwargs)
    if env_vars:  # Ray wants strings; YAML gives numbers and booleans as such
        kwargs["runtime_env"] = {**kwargs["runtime_env"], "env_vars": env_vars}
    address = config.ray_address or os.environ.get("RAY_ADDRESS") or kwargs.pop("address", None)
    if address:
        kwargs["address"] = address
    else:
        # Sized to the machine, but never smaller than the workers asked for: a 2-core laptop can
        # still run 2 one-CPU workers (each uses one torch thread, see train_loop_per_worker).
        needed = config.ray_num_workers * float(config.resources_per_worker.get("CPU", 1))
        kwargs.setdefault("num_cpus", max(os.cpu_count() or 1, int(needed + 0.999)))
    try:
        ray.init(**kwargs)
    except (ConnectionError, TypeError, ValueError) as error:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise UserError(f"could not connect to {where}: {error} "
                        "(check ray_address / RAY_ADDRESS and ray_init_kwargs).") from None
    try:
        yield not address
    finally:
        ray.shutdown()


def _check_resources(config: RunConfig, use_gpu: bool, started_here: bool) -> None:
    """Resources the workers ask for and the cluster does not have: an error on a local cluster
    (nothing will add them), a warning on a real one (an autoscaler may)."""
    import ray

    per_worker = dict(config.resources_per_worker) or {"CPU": 1}
    total = ray.cluster_resources()
    missing = [f"{name}: {amount * config.ray_num_workers:g} (cluster has {total.get(name, 0):g})"
               for name, amount in per_worker.items() if total.get(name, 0) < float(amount) * config.ray_num_workers]
    if not missing:
        return
    message = (f"ray_num_workers: {config.ray_num_workers} × resources_per_worker {per_worker} needs "
               f"{', '.join(missing)}")
    if started_here:
        hint = " Remove GPU from resources_per_worker to train on CPU." if use_gpu else ""
        raise UserError(f"{message} on this machine's local Ray cluster. Lower ray_num_workers or "
                        f"resources_per_worker, or set ray_address to a cluster that has them.{hint}")
    print(f"warning: {message}; Ray Train waits until the cluster provides them (an autoscaler may add nodes).")


def _decide_resume(config: RunConfig, storage: "RunFolder") -> None:
    """Continue, replace or refuse the run folder (the rule is in the module docstring)."""
    latest = storage.latest_checkpoint()
    if latest is None:
        if config.resume_from_checkpoint == "true":
            raise UserError(f"resume_from_checkpoint: true, but the Ray run folder {storage.uri} holds no "
                            "registered checkpoint; remove the key to start a new run.")
        return
    stored = storage.read_yaml(RUN_CONFIG_FILE)
    changed = _training_changes(stored, config) if stored is not None else []
    if not changed:
        print(f"resuming the Ray run {storage.uri} from {latest} (use a new ray_run_name to start over)")
        if config.resume_from_checkpoint not in (None, "true"):
            print(f"note: resume_from_checkpoint: {config.resume_from_checkpoint} is not used: a run folder's "
                  "own latest checkpoint comes first")
        return
    what = "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
    if not config.overwrite_output_dir:
        raise UserError(f"the Ray run folder {storage.uri} holds a run with other training settings ({what}). "
                        "Set overwrite_output_dir: true to replace it, choose a new ray_run_name, or restore "
                        "the settings to resume it.")
    print(f"replacing the Ray run folder {storage.uri}: its run had other training settings ({what})")
    storage.clear()


def _training_changes(stored: dict, config: RunConfig) -> list[str]:
    def global_batch(values: dict) -> int:
        return (int(values.get("per_device_train_batch_size", 0)) * int(values.get("gradient_accumulation_steps", 0))
                * int(values.get("ray_num_workers", 0)))

    current = config.to_dict()
    changed = [f"{key} {stored.get(key)!r} → {value!r}" for key, value in current.items()
               if key not in NOT_TRAINING_KEYS and stored.get(key) != value]
    if global_batch(stored) != global_batch(current):
        changed.append(f"global batch size {global_batch(stored)} → {global_batch(current)}")
    return changed


def _make_trainer(config: RunConfig, use_gpu: bool, env_vars: dict, train_loop):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "cwd": os.getcwd()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=config.ddp_timeout),
        scaling_config=ScalingConfig(
            num_workers=config.ray_num_workers, use_gpu=use_gpu,
            resources_per_worker=dict(config.resources_per_worker) or None,
            placement_strategy=config.placement_strategy,
        ),
        run_config=RayRunConfig(
            name=config.ray_run_name, storage_path=config.ray_storage_path,
            failure_config=FailureConfig(max_failures=config.ray_max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
            # Also here, not only in ray.init: a Ray session that was already open (or a cluster
            # joined with other job settings) still gives the workers the YAML's variables.
            worker_runtime_env={"env_vars": env_vars},
        ),
    )


def _plain_error(error: Exception) -> Exception:
    """The UserError a worker raised (exit 2, its message only), else a short RuntimeError naming
    each failed worker's error (the full tracebacks are in the Ray log above)."""
    failures = getattr(error, "worker_failures", None) or {}
    causes = [getattr(cause, "cause", None) or cause for cause in failures.values()]
    for cause in causes:
        user_error = _find_user_error(cause)
        if user_error is not None:
            return UserError(str(user_error))
    if not causes:
        return RuntimeError(f"Ray training failed: {error}")
    lines = [f"rank {rank}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
             for rank, cause in sorted(failures.items())]
    return RuntimeError("Ray training failed (ray_max_failures: restarts exhausted or 0):\n  " + "\n  ".join(lines))


def _find_user_error(error: BaseException | None) -> BaseException | None:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, UserError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return None
