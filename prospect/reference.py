"""KTO's reference log-probs: computed once, for the examples a run needs, saved as they are computed.

The reference model is the policy with its adapters disabled (LoRA) or a frozen copy taken before
training (full fine-tuning), `reference_model`. Its summed log-probs of every target completion and
every KL pair are computed before the first step, stored in output_dir/reference_logps.safetensors
under a key of everything they depend on (`reference_key`), and reused by every epoch, by
evaluation and by a resumed or restarted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import torch

from prospect import checkpoints
from prospect.batching import Examples, batches_of, rank_share
from prospect.config import RunConfig, adapter_paths
from prospect.forward import sequence_logps
from prospect.model import model_folder
from prospect.sharding import even_batches


@torch.no_grad()
def compute_reference_logps(examples: Examples, hidden_model, head, *, accelerator, batch_size: int,
                            indices: list[int] | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reference log-probs of the completions and KL pairs of `indices` (default: every example),
    [len(indices)] each, on every rank.

    Ranks split the indices and sum their parts with one all-reduce. Returns also how many packed
    forward passes this rank ran (tests count them: the reference must run once per example)."""
    indices = list(range(len(examples))) if indices is None else indices
    logps = torch.zeros(len(indices), device=accelerator.device)
    kl_logps = torch.zeros(len(indices), device=accelerator.device)
    mine = list(rank_share(len(indices), accelerator.process_index, accelerator.num_processes))  # positions in indices
    passes = 0
    for positions, keep in even_batches(batches_of(mine, batch_size), [0], hidden_model, accelerator):
        chunk = [indices[position] for position in positions]
        where = torch.tensor(positions, device=accelerator.device)
        batch = examples.targets(chunk)
        cache = examples.prompt_cache(chunk, hidden_model, batch)  # the KL pass reuses the targets' prompts
        target_logps = sequence_logps(hidden_model, head, batch, accelerator.device, cache)[0]
        if cache is not None:
            cache.extend()
        kl_batch = examples.kl_pairs(chunk) if cache is None else examples.kl_continuations(chunk)
        pair_logps = sequence_logps(hidden_model, head, kl_batch, accelerator.device, cache)[0]
        if not keep:  # a sharded model's filler forward (every rank runs as many): dropped
            continue
        logps[where], kl_logps[where] = target_logps, pair_logps
        passes += 2
        if progress is not None:
            progress.update(1)
    if accelerator.num_processes > 1:
        logps, kl_logps = accelerator.reduce(logps, "sum"), accelerator.reduce(kl_logps, "sum")
    return logps.cpu(), kl_logps.cpu(), passes


def reference_key(config: RunConfig, examples: Examples) -> str:
    """Everything a split's reference log-probs depend on: the model and starting adapters (their
    files), the precision and quantization, cutoff_len (KL pairs are cut at it) and the split's
    tokens, labels, prompt lengths and KL pairing."""
    parts = {
        "model": config.model_name_or_path,
        "model_files": _files_fingerprint(model_folder(config.model_name_or_path, cache_dir=config.cache_dir)),
        "adapter": config.adapter_name_or_path,
        "adapter_files": [_files_fingerprint(path) for path in adapter_paths(config.adapter_name_or_path)],
        "finetuning_type": config.finetuning_type,
        "bf16": config.bf16,
        "fp16": config.fp16,
        "quantization_bit": config.quantization_bit,
        "cutoff_len": config.cutoff_len,
        "examples": examples.fingerprint,
    }
    if config.quantization_bit == 4:  # only then: keys of runs without it stay what they were
        parts["quantization_4bit"] = [config.quantization_type, config.double_quantization]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _files_fingerprint(path: str) -> list:
    """Of a weights file, or of the weights and config files of a model or adapter folder: each file's
    name, size and a hash of its first and last MiB. A model or adapter replaced at the same path changes
    it (new weights change those bytes too); a copy on another node does not (no file times)."""
    if not path or not Path(path).expanduser().exists():
        return []  # a hub id: its name is in the key
    target = Path(path).expanduser()
    files = [target] if target.is_file() else sorted(
        p for p in target.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".gguf") and p.name != checkpoints.REFERENCE_FILE)
    fingerprint = []
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(2**20)
            f.seek(max(0, size - 2**20))
            tail = f.read(2**20)
        fingerprint.append((file.name, size, hashlib.sha256(head + tail).hexdigest()))
    return fingerprint


# Reference batches (per rank) between two saves of the reference file: a crash, or a lost Ray worker,
# loses at most this much of the pass.
REFERENCE_SAVE_EVERY = 64


def load_or_compute_reference(config, splits: dict[str, tuple[Examples, list[int]]], make_reference, *,
                              accelerator, output_dir: Path | None, on_save=None) -> int:
    """Fill each split's reference log-probs for the indices it needs.

    `splits` maps a split's name to (its examples, the indices the run needs). What
    output_dir/reference_logps.safetensors (output_dir None: no file) holds under the same
    `reference_key` is reused; the rest is computed (`make_reference()` is a context giving the
    reference model's (HiddenStates, output head)) and the file is rewritten every
    REFERENCE_SAVE_EVERY batches, so a restarted run continues the pass where it stopped. `on_save(path)`, if given, runs on the main process after each save (Ray
    copies the file to shared storage). Returns the number of reference forward passes run."""
    from tqdm.auto import tqdm

    path = output_dir / checkpoints.REFERENCE_FILE if output_dir is not None else None  # None: not stored
    examples_of = {name: examples for name, (examples, _) in splits.items()}
    keys = {name: reference_key(config, examples) for name, examples in examples_of.items()}
    stored = _read_reference_file(path, keys) if accelerator.is_main_process and path is not None else {}
    todo = {}
    for name, (examples, needed) in splits.items():
        # The main process's file is the truth: on Ray across nodes another rank's output_dir may lack it.
        for attribute in ("logps", "kl_logps"):
            values = stored.get(f"{name}_{attribute}", torch.full((len(examples),), float("nan")))
            setattr(examples, f"reference_{attribute}", _broadcast(values, accelerator))
        missing = torch.isnan(examples.reference_logps).numpy()
        todo[name] = [i for i in needed if missing[i]]
    if not any(todo.values()):
        return 0

    batch_size, world, rank = config.per_device_eval_batch_size, accelerator.num_processes, accelerator.process_index
    rounds = [(name, batch) for name, missing in todo.items()
              for batch in batches_of(missing, world * batch_size * REFERENCE_SAVE_EVERY)]
    my_batches = sum(math.ceil(len(rank_share(len(indices), rank, world)) / batch_size) for _, indices in rounds)
    progress = tqdm(total=my_batches, desc="reference log-probs", disable=not accelerator.is_main_process,
                    leave=False, dynamic_ncols=True)
    passes = 0
    with make_reference() as (reference_model, reference_head):
        for name, indices in rounds:
            examples = examples_of[name]
            logps, kl_logps, n = compute_reference_logps(
                examples, reference_model, reference_head, accelerator=accelerator,
                batch_size=batch_size, indices=indices, progress=progress)
            examples.reference_logps[indices], examples.reference_kl_logps[indices] = logps, kl_logps
            passes += n
            if accelerator.is_main_process and path is not None:
                _write_reference_file(path, keys, examples_of)
                if on_save is not None:
                    on_save(path)
    progress.close()
    accelerator.wait_for_everyone()
    return passes


def _read_reference_file(path: Path, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of the reference file of each split whose stored key is `keys[split]`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            stored_keys = f.metadata() or {}
            tensors = {}
            for name in f.keys():  # <split>_logps, <split>_kl_logps
                split = name.removesuffix("_kl_logps").removesuffix("_logps")
                if split in keys and stored_keys.get(split) == keys[split]:
                    tensors[name] = f.get_tensor(name)
            return tensors
    except (SafetensorError, OSError, ValueError):  # a damaged file is recomputed, never trusted
        return {}


def _write_reference_file(path: Path, keys: dict[str, str], splits: dict[str, Examples]) -> None:
    """One file for every split: `<split>_logps` and `<split>_kl_logps` [N] (NaN: not computed yet),
    and each split's `reference_key` in the metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for name, examples in splits.items():
        tensors[f"{name}_logps"] = examples.reference_logps.contiguous()
        tensors[f"{name}_kl_logps"] = examples.reference_kl_logps.contiguous()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=keys)
    os.replace(tmp, path)  # atomic: a crash during the save leaves the previous file whole


def _broadcast(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """The main process's tensor on every rank (CPU)."""
    if accelerator.num_processes == 1:
        return tensor
    from accelerate.utils import broadcast

    return broadcast(tensor.to(accelerator.device), from_process=0).cpu()


def reference_model(hidden_model, frozen_reference, accelerator):
    """A context giving the reference model's (HiddenStates, output head): the policy with its
    adapters disabled (LoRA: no second copy), or the frozen copy taken before training (full)."""
    @contextlib.contextmanager
    def reference():
        policy = accelerator.unwrap_model(hidden_model)
        was_training = policy.training
        policy.eval()
        try:
            if frozen_reference is not None:
                # The copy (a HiddenStates) was taken before `accelerator.prepare`, which puts the policy's
                # forward (not its head) under autocast; the copy's forward gets the same, or a bf16 run's
                # reference would differ from the policy at step 0.
                frozen = frozen_reference
                frozen.forward = accelerator.autocast()(frozen.forward)
                yield frozen, frozen.causal_lm().get_output_embeddings()
            else:
                with policy.model.disable_adapter():
                    yield policy, policy.causal_lm().get_output_embeddings()
        finally:
            policy.train(was_training)

    return reference()
