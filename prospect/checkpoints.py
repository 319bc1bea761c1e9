"""Checkpoints that are either complete or absent, and the output folder's rules.

A checkpoint is written into a hidden temporary folder (`.checkpoint-<step>.tmp`) and renamed to
`checkpoint-<step>` only once every file is on disk, so a crash during a save never leaves a folder
that looks complete: resume only ever sees whole checkpoints. A checkpoint holds the adapter (or the
full weights), the optimizer and scheduler states, every rank's random-number-generator states and
`trainer_state.json` (the step, and what the data order depends on), which is all a run needs to
continue exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from prospect.errors import UserError

STATE_FILE = "trainer_state.json"
# KTO's reference log-probs, saved while they are computed (prospect/train.py). They are a cache, keyed by
# everything they depend on: a folder holding only them counts as empty, and overwrite_output_dir keeps
# them, so a run restarted before its first checkpoint continues the reference pass.
REFERENCE_FILE = "reference_logps.safetensors"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

# What a run writes into output_dir; `overwrite_output_dir` removes these and nothing else, so files
# a user keeps there survive.
RUN_OUTPUTS = (
    "adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "run_config.yaml", "metrics.jsonl",
    "train_results.json", "eval_results.json", "training_loss.png", "training_rewards.png", "training_kl.png",
    "README.md",
)
RUN_OUTPUT_FOLDERS = ("runs", "mlruns")
# A DeepSpeed run's checkpoint also holds the engine's own checkpoint (optimizer state, one file per process)
DEEPSPEED_FOLDER, DEEPSPEED_TAG = "deepspeed", "state"


def prepare_output_dir(output_dir: str, *, overwrite: bool, resume: str | None) -> None:
    """Create output_dir, or check that reusing it is what the user asked for (main process only)."""
    path = Path(output_dir)
    if not path.exists():
        path.mkdir(parents=True)
        return
    if not path.is_dir():
        raise UserError(f"output_dir: {output_dir} exists and is not a folder; choose another output_dir.")
    entries = _entries(path)
    if not entries or resume:
        return
    if not overwrite:
        raise UserError(
            f"output_dir: {output_dir} is not empty ({len(entries)} entries). Set overwrite_output_dir: true to "
            "replace the previous run's outputs, resume_from_checkpoint: true to continue it, or choose another "
            "output_dir."
        )
    for entry in entries:
        if entry.name in RUN_OUTPUTS and entry.is_file():
            entry.unlink()
        elif entry.is_dir() and (_CHECKPOINT.fullmatch(entry.name) or entry.name in RUN_OUTPUT_FOLDERS):
            shutil.rmtree(entry)
        elif entry.name.endswith((".safetensors",)) and entry.name.startswith("model-"):
            entry.unlink()  # shards of a previous full fine-tuning run


def _entries(path: Path) -> list[Path]:
    """What a folder holds besides hidden files and the reference log-probs (a cache, see REFERENCE_FILE)."""
    return [p for p in path.iterdir() if not p.name.startswith(".") and p.name != REFERENCE_FILE]


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints in output_dir, oldest first (temporary folders are never listed)."""
    path = Path(output_dir)
    if not path.is_dir():
        return []
    found = [p for p in path.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """`resume_from_checkpoint`: a checkpoint folder, or "true" for the latest complete one in output_dir."""
    if resume is None:
        return None
    if resume == "true":
        found = complete_checkpoints(output_dir)
        if not found and Path(output_dir).is_dir() and not _entries(Path(output_dir)):
            return None  # a run stopped before its first checkpoint: start it again (reusing its reference log-probs)
        if not found:
            raise UserError(
                f"resume_from_checkpoint: true, but {output_dir} holds no complete checkpoint-<step> folder; "
                "remove the key to start a new run."
            )
        return found[-1]
    path = Path(resume)
    if not is_complete(path):
        raise UserError(
            f"resume_from_checkpoint: {resume} is not a complete checkpoint (no {STATE_FILE}, or files missing); "
            f"point it at a checkpoint-<step> folder, or use true for the latest one in output_dir."
        )
    return path


def is_complete(folder: Path) -> bool:
    """The state file is written last, and lists every file written before it with its size: a
    checkpoint copied to other storage (Ray) is complete only if the copy holds all of them whole."""
    try:
        state = json.loads((Path(folder) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    sizes = state.get("files", {})
    return all((Path(folder) / name).is_file() and (Path(folder) / name).stat().st_size == size
               for name, size in sizes.items())


def rng_states() -> dict:
    """Every generator's state, in types `torch.load(weights_only=True)` reads back (no pickled objects)."""
    import numpy as np
    import torch

    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_state(path: Path):
    """A checkpoint's optimizer, scheduler or RNG file, read as tensors and plain values only: a
    pickled object (which could run code when read, e.g. a file planted in shared storage) is refused."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        # torch names the offending object ("Trying to load unsupported GLOBAL posix.system ...")
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise UserError(
            f"{path}: holds more than tensors and plain values{what}, so it is not read: loading it could run "
            "code. Resume from a checkpoint written by prospect, or start a new run."
        ) from None


def temporary_folder(output_dir: str, step: int) -> Path:
    return Path(output_dir) / f".checkpoint-{step}.tmp"


def write_rng_state(folder: Path, rank: int) -> None:
    """Each rank writes its own generator states (dropout differs per rank)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_states(), folder / f"rng_state_{rank}.pt")


def write_main_files(folder: Path, *, model, optimizer, scheduler, state: dict, weights: dict | None = None,
                     optimizer_state: dict | None = None) -> None:
    """Weights, optimizer, scheduler and the trainer state (main process only); the state file is
    written last so its presence means everything else is there. A sharded run passes its gathered
    `weights` and name-keyed `optimizer_state` (`sharding.gather_state`); a DeepSpeed run no optimizer
    (the engine wrote its state)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), state_dict=weights)
    if optimizer is not None:
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / STATE_FILE).write_text(json.dumps({**state, "files": files}, indent=1))


def publish(folder: Path, step: int, save_total_limit: int | None) -> Path:
    """Rename the finished temporary folder to checkpoint-<step> and prune old checkpoints."""
    final = folder.parent / f"checkpoint-{step}"
    if final.exists():  # an earlier attempt at the same step: the new one replaces it whole
        shutil.rmtree(final)
    os.replace(folder, final)
    if save_total_limit is not None:
        for old in complete_checkpoints(str(folder.parent))[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(output_dir: str) -> None:
    """Half-written checkpoints of a crashed run: never used, removed at the next start."""
    for tmp in Path(output_dir).glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_state(folder: Path) -> dict:
    """A checkpoint's trainer_state.json: what the run that wrote it depended on (checked before resuming)."""
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load_checkpoint(folder: Path, *, model, optimizer, scheduler, rank: int, lora: bool, sharded: bool = False,
                    engine=None) -> None:
    """Restore weights, optimizer, scheduler and this rank's RNG states.

    The optimizer state is keyed by parameter number (written by an unsharded run) or by parameter
    name (a sharded run's, `sharding.gather_state`); a checkpoint of either kind resumes sharded or
    not, on any number of processes (the global batch size must stay the same). A DeepSpeed run's
    `engine` loads its own checkpoint (weights and this process's optimizer state)."""
    if engine is not None:
        engine.load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, load_module_strict=not lora,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    else:
        _load_weights_and_optimizer(folder, model, optimizer, rank=rank, lora=lora, sharded=sharded)
    scheduler.load_state_dict(load_state(folder / "scheduler.pt"))
    rng_file = folder / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        set_rng_states(load_state(rng_file))


def _load_weights_and_optimizer(folder: Path, model, optimizer, *, rank: int, lora: bool, sharded: bool) -> None:
    from prospect import sharding

    optimizer_state = load_state(folder / "optimizer.pt")
    by_name = any(isinstance(key, str) for key in optimizer_state.get("state", {}))
    if not sharded and not by_name:
        if lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        else:
            _load_full_weights(model, folder)
        optimizer.load_state_dict(optimizer_state)
    elif sharded and rank != 0:  # the main process's files are broadcast and sliced onto every process
        sharding.load_state(model, optimizer, {}, {}, sharded=True)
    else:
        names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        if not by_name:  # numbered in the order of the trainable parameters, as the optimizer was given them
            optimizer_state = sharding.state_by_name(optimizer_state, names)
        weights = _adapter_by_name(model, folder, names) if lora else _load_full_weights(None, folder)
        sharding.load_state(model, optimizer, weights, optimizer_state, sharded=sharded)


def _adapter_by_name(model, folder: Path, names: list[str]) -> dict:
    """The adapter file's tensors under the model's parameter names (the file leaves out the adapter's name)."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    adapter = f".{model.active_adapter}."
    missing = [name for name in names if name.replace(adapter, ".") not in saved]
    if missing:
        raise UserError(f"{folder}: the checkpoint's adapter does not match the model (missing {missing[:3]}).")
    return {name: saved[name.replace(adapter, ".")] for name in names}


def _load_full_weights(model, folder: Path) -> dict | None:
    """Load a full checkpoint's weights into `model`; without a model, return them."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights = {}
    for name in files:
        weights.update(load_file(str(folder / name)))
    if model is None:
        return weights
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output embeddings are saved once; anything else missing means a different model.
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise UserError(f"{folder}: the checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}).")
