"""`train(config)`: one function that trains, in a plain process, under torchrun, or in a Ray worker.

The path of a run, top to bottom:

    config ─► tokenizer + encoded data (cached) ─► model (+ LoRA) ─► optimizer, schedule
           ─► KTO: reference log-probs, computed once and stored in the run folder
           ─► for each optimizer step: its examples ─► packed micro-batches ─► loss ─► backward
                                       ─► clip, step ─► log / evaluate / checkpoint
           ─► adapter (or weights), tokenizer, run_config.yaml, train_results.json, plots

The loop is ours; Accelerate provides the device, mixed precision and the distributed plumbing
(DDP's gradient all-reduce). Nothing here is process-global: every piece of state is a local of
`train`, so Ray can call it again in a restarted worker.

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
import functools
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from prospect import checkpoints
from prospect.config import RunConfig, adapter_paths
from prospect.data.encode import IGNORE_INDEX
from prospect.data.pipeline import prepare_data
from prospect.data.report import balance_advice, kto_balance
from prospect.errors import UserError
from prospect.losses import kl_partners, kto_loss, kto_reference_point, token_logps
from prospect.model import load_tokenizer, load_trainable_model, model_folder
from prospect.packing import PACKED_ATTENTIONS, PackedBatch, PromptCache, pack, packed_attention_implementation



# --------------------------------------------------------------------------------------------------
# Which examples each optimizer step trains on


@dataclass(frozen=True)
class Schedule:
    num_examples: int
    micro_batch_size: int  # per_device_train_batch_size
    accumulation_steps: int
    world_size: int
    steps_per_epoch: int
    total_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.world_size


def plan_schedule(num_examples: int, config: RunConfig, world_size: int) -> Schedule:
    global_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(num_examples / global_batch)  # the last step of an epoch may be smaller
    total = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.num_train_epochs)
    return Schedule(num_examples, config.per_device_train_batch_size, config.gradient_accumulation_steps,
                    world_size, steps_per_epoch, max(1, total))


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in `epoch`: a permutation drawn from (seed, epoch) only."""
    order = list(range(num_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    return order


def step_examples(schedule: Schedule, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based), the same on every rank."""
    epoch, position = divmod(step, schedule.steps_per_epoch)
    start = position * schedule.global_batch_size
    return epoch_order(schedule.num_examples, seed, epoch)[start : start + schedule.global_batch_size]


def examples_of_steps(schedule: Schedule, seed: int, first_step: int) -> list[int]:
    """The sorted indices of every example that steps first_step .. total_steps − 1 train on."""
    needed: set[int] = set()
    step = first_step
    while step < schedule.total_steps and len(needed) < schedule.num_examples:
        epoch, position = divmod(step, schedule.steps_per_epoch)
        end = min(schedule.total_steps, (epoch + 1) * schedule.steps_per_epoch)  # this epoch's steps in range
        order = epoch_order(schedule.num_examples, seed, epoch)
        needed.update(order[position * schedule.global_batch_size :
                            (end - epoch * schedule.steps_per_epoch) * schedule.global_batch_size])
        step = end
    return sorted(needed)


def rank_micro_batches(indices: list[int], schedule: Schedule, rank: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of one step, as (example indices, loss weight).

    A full step gives every rank `accumulation_steps` micro-batches of `micro_batch_size`. The short
    last step of an epoch is spread evenly; a slot left without an example gets a stand-in example
    with weight 0, because every rank must run the same number of backward passes (DDP all-reduces
    in each)."""
    slots = schedule.accumulation_steps * schedule.world_size
    per_slot = [len(chunk) for chunk in np.array_split(np.arange(len(indices)), slots)]
    bounds = np.cumsum([0] + per_slot)
    micro_batches = []
    for micro in range(schedule.accumulation_steps):
        slot = micro * schedule.world_size + rank
        chunk = indices[bounds[slot] : bounds[slot + 1]]
        micro_batches.append((chunk, 1.0) if chunk else ([indices[0]], 0.0))
    return micro_batches


# --------------------------------------------------------------------------------------------------
# Encoded examples as packed sequences


class Examples:
    """One split's encoded examples and, for KTO, each example's KL partner and reference log-probs."""

    def __init__(self, dataset, *, stage: str, cutoff_len: int, seed: int):
        self.dataset = dataset.select_columns(["input_ids", "labels", "prompt_len", "label"])
        self.stage = stage
        self.cutoff_len = cutoff_len
        # Columns written at encode time, read through the dataset's indexing: a split (val_size) or the
        # selection of kept rows is an index mapping over the stored table, which only indexing applies.
        counts = dataset.select_columns(["num_trained_targets", "num_tokens"]).with_format("numpy")[:]
        self.num_trained_targets = counts["num_trained_targets"].astype(np.int64)  # [N] tokens with loss
        self.num_tokens = counts["num_tokens"].astype(np.int64)  # [N]
        self.partners: list[int] | None = None
        # [N] summed completion log-probs of the reference model, and the same for each KL pair; NaN
        # where not computed (the reference pass computes only what the run trains and evaluates on).
        self.reference_logps: torch.Tensor | None = None
        self.reference_kl_logps: torch.Tensor | None = None
        if stage == "kto":
            if len(dataset) < 2:
                raise UserError("stage: kto needs at least 2 examples (each is paired with another for the KL term).")
            self.partners = kl_partners(len(dataset), seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def labels(self, indices: list[int]) -> torch.Tensor:
        return torch.tensor(self.dataset[indices]["label"], dtype=torch.bool)

    def targets(self, indices: list[int]) -> PackedBatch:
        rows = self.dataset[indices]
        return pack(list(zip(rows["input_ids"], rows["labels"])))

    def _kl_pair_ids(self, indices: list[int]) -> list[tuple[list[int], int]]:
        """(prompt of example i + completion of its partner, cut to cutoff_len; the prompt's length) per index."""
        rows = self.dataset[indices]
        partners = self.dataset[[self.partners[i] for i in indices]]
        return [
            ((ids[:prompt_len] + partner_ids[partner_prompt_len:])[: self.cutoff_len], prompt_len)
            for ids, prompt_len, partner_ids, partner_prompt_len in zip(
                rows["input_ids"], rows["prompt_len"], partners["input_ids"], partners["prompt_len"])
        ]

    def kl_pairs(self, indices: list[int]) -> PackedBatch:
        """Prompt of example i + completion of its partner, cut to cutoff_len; the completion is trained."""
        return pack([(pair, [IGNORE_INDEX] * prompt_len + pair[prompt_len:])
                     for pair, prompt_len in self._kl_pair_ids(indices)])

    def kl_continuations(self, indices: list[int]) -> PackedBatch:
        """The KL pairs of `kl_pairs` from their last prompt token on, at their positions in the pair: what
        the policy runs on top of a `PromptCache` of the prompts (all but their last token), captured by
        the forward over `targets(indices)`. Same log-probs as `kl_pairs`, without computing prompts twice."""
        pairs = self._kl_pair_ids(indices)
        batch = pack([(pair[prompt_len - 1 :], [IGNORE_INDEX] + pair[prompt_len:]) for pair, prompt_len in pairs])
        offsets = torch.tensor([prompt_len - 1 for _, prompt_len in pairs])
        batch.position_ids += offsets[batch.sequence_index]
        return batch

    def prompt_cache(self, indices: list[int], hidden_model) -> PromptCache | None:
        """A `PromptCache` for the prompts of `indices` (all but their last token), or None where it
        cannot be used: an attention backend other than prospect's packed ones, or a prompt of 0 tokens or
        longer than cutoff_len."""
        model = getattr(hidden_model, "module", hidden_model)  # DDP wraps the HiddenStates module
        if model.causal_lm().config._attn_implementation not in PACKED_ATTENTIONS:
            return None
        prompt_lens = self.dataset[indices]["prompt_len"]
        if not prompt_lens or min(prompt_lens) < 1 or max(prompt_lens) > self.cutoff_len:
            return None
        return PromptCache([n - 1 for n in prompt_lens])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the split's token ids, labels, prompt lengths and KL pairing, row by row in the
        split's order: what the reference log-probs (and a resumed run's data) depend on."""
        h = hashlib.sha256()
        table = self.dataset.with_format("arrow")[:]  # the split's own rows (its index mapping applied)
        for name in ("input_ids", "labels", "prompt_len"):
            column = table.column(name).combine_chunks()
            if hasattr(column, "flatten"):  # a list column: each row's length, then every value
                h.update(column.value_lengths().to_numpy(zero_copy_only=False).tobytes())
                column = column.flatten()
            h.update(column.to_numpy(zero_copy_only=False).tobytes())
        h.update(json.dumps(self.partners).encode())
        return h.hexdigest()


def batches_of(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


# --------------------------------------------------------------------------------------------------
# The model's forward pass, up to log-probs


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
    """(per-sequence summed log-probs of the targets [B], per-token log-probs [T]), float32."""
    batch = batch.to(device)
    extra = {} if prompt_cache is None else {"prompt_cache": prompt_cache}
    hidden = hidden_model(**batch.model_inputs(), **extra)
    per_token = token_logps(hidden, head, batch.targets)
    per_sequence = torch.zeros(batch.num_sequences, dtype=torch.float32, device=device)
    return per_sequence.index_add(0, batch.sequence_index, per_token), per_token


# --------------------------------------------------------------------------------------------------
# KTO reference log-probs: computed once, for the examples the run needs, saved as they are computed


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
    mine = list(range(accelerator.process_index, len(indices), accelerator.num_processes))  # positions in indices
    passes = 0
    for positions in batches_of(mine, batch_size):
        chunk = [indices[position] for position in positions]
        where = torch.tensor(positions, device=accelerator.device)
        cache = examples.prompt_cache(chunk, hidden_model)  # the KL pass reuses the targets' prompts
        logps[where] = sequence_logps(hidden_model, head, examples.targets(chunk), accelerator.device, cache)[0]
        if cache is not None:
            cache.mode = "extend"
        kl_batch = examples.kl_pairs(chunk) if cache is None else examples.kl_continuations(chunk)
        kl_logps[where] = sequence_logps(hidden_model, head, kl_batch, accelerator.device, cache)[0]
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
                              accelerator, output_dir: Path, on_save=None) -> int:
    """Fill each split's reference log-probs for the indices it needs.

    `splits` maps a split's name to (its examples, the indices the run needs). What
    output_dir/reference_logps.safetensors holds under the same `reference_key` is reused; the rest is
    computed (`make_reference()` is a context giving the reference model's (HiddenStates, output head))
    and the file is rewritten every REFERENCE_SAVE_EVERY batches, so a restarted run continues the
    pass where it stopped. `on_save(path)`, if given, runs on the main process after each save (Ray
    copies the file to shared storage). Returns the number of reference forward passes run."""
    from tqdm.auto import tqdm

    path = output_dir / checkpoints.REFERENCE_FILE
    examples_of = {name: examples for name, (examples, _) in splits.items()}
    keys = {name: reference_key(config, examples) for name, examples in examples_of.items()}
    stored = _read_reference_file(path, keys) if accelerator.is_main_process else {}
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
    my_batches = sum(math.ceil(len(range(rank, len(indices), world)) / batch_size) for _, indices in rounds)
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
            if accelerator.is_main_process:
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


# --------------------------------------------------------------------------------------------------
# Metrics: sums over steps and ranks, reported as means


class Window:
    """Sums of one logging window (or one evaluation); `means()` turns them into the logged metrics."""

    KEYS = ("loss_sum", "loss_count", "chosen_rewards", "num_chosen", "rejected_rewards", "num_rejected",
            "chosen_logps", "rejected_logps", "kl", "grad_norm", "steps", "seconds", "tokens", "trained_tokens",
            "correct_sign")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, values: dict) -> None:
        for key, value in values.items():
            self.sums[key] += float(value)

    def means(self, stage: str) -> dict:
        s = self.sums
        out = {"loss": s["loss_sum"] / max(s["loss_count"], 1)}
        if stage == "kto":
            if s["num_chosen"]:
                out["rewards/chosen"] = s["chosen_rewards"] / s["num_chosen"]
                out["logps/chosen"] = s["chosen_logps"] / s["num_chosen"]
            if s["num_rejected"]:
                out["rewards/rejected"] = s["rejected_rewards"] / s["num_rejected"]
                out["logps/rejected"] = s["rejected_logps"] / s["num_rejected"]
            if s["num_chosen"] and s["num_rejected"]:
                out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
            out["kl"] = s["kl"] / max(s["steps"], 1)
        return out


def reduce_sums(values: dict, accelerator) -> dict:
    """Sum a dict of numbers over ranks with one all-reduce."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    tensor = accelerator.reduce(tensor, "sum")
    return dict(zip(keys, tensor.tolist()))


def global_reference_point(policy_kl_logps: list[torch.Tensor], reference_kl_logps, accelerator) -> torch.Tensor:
    """KTO's z0 over the KL pairs of all ranks (`kto_reference_point` of all of them): each rank's mean
    weighted by its count, then clamped. A rank may hold no pair (a short last step, a small eval set)."""
    if not policy_kl_logps:
        local_mean, count = 0.0, 0
    else:
        policy = torch.cat(policy_kl_logps)
        local_mean, count = float(kto_reference_point(policy, reference_kl_logps, clamp=False)), len(policy)
    totals = reduce_sums({"sum": local_mean * count, "count": count}, accelerator)
    return torch.tensor(totals["sum"] / totals["count"]).clamp(min=0)


def kto_sums(losses, rewards, policy_logps, labels, weight: float = 1.0) -> dict:
    chosen, rejected = labels, ~labels
    return {
        "loss_sum": float(losses.detach().sum()) * weight,
        "loss_count": len(labels) * weight,
        "chosen_rewards": float(rewards[chosen].sum()) * weight,
        "num_chosen": int(chosen.sum()) * weight,
        "rejected_rewards": float(rewards[rejected].sum()) * weight,
        "num_rejected": int(rejected.sum()) * weight,
        "chosen_logps": float(policy_logps.detach()[chosen].sum()) * weight,
        "rejected_logps": float(policy_logps.detach()[rejected].sum()) * weight,
        "correct_sign": float(((rewards > 0) == labels).sum()) * weight,
    }


# --------------------------------------------------------------------------------------------------
# The run


def train(config: RunConfig, *, on_checkpoint=None, on_reference_saved=None) -> dict:
    """Train as `config` says; return the contents of train_results.json.

    `on_checkpoint(step, folder, is_main)`, if given, runs on every rank once checkpoint-<step> is
    complete; `on_reference_saved(path)` on the main process each time the KTO reference file is
    saved (Ray workers use both to copy them to shared storage, see prospect/ray_launch.py)."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from prospect.tracking import Tracker

    if config.fp16 and not torch.cuda.is_available():
        raise UserError("fp16: true needs a CUDA GPU; on CPU train in float32 (bf16: false) or bf16: true.")
    config.refuse_unbuilt()
    # Accelerate keeps its settings in a process-wide singleton; a new run (a test, a restarted Ray
    # worker) must not inherit the last run's mixed precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: Accelerate joins a CPU (gloo) process group under torchrun only when told.
    # ddp_timeout: how long a collective waits under torchrun (Ray sets it on the group it creates).
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if config.bf16 else "fp16" if config.fp16 else "no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))])
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
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
    if config.stage == "kto":
        labels = train_set.dataset["label"]
        num_desirable = sum(1 for label in labels if label)
        num_undesirable = len(labels) - num_desirable
        _, suggested = kto_balance(num_desirable, num_undesirable, config.kto_chosen_weight, config.kto_rejected_weight)
        balanced = suggested is None and num_desirable and num_undesirable
        say(f"{'' if balanced else 'warning: '}KTO label balance: "
            f"{balance_advice(config, num_desirable, num_undesirable)}")

    # --- model, optimizer, schedule ------------------------------------------------------------
    attention, warning = packed_attention_implementation(config.flash_attn, accelerator.device)
    if warning:
        say(f"warning: {warning}")
    if config.enable_liger_kernel:  # its fused linear + cross-entropy is what token_logps already does
        say("warning: enable_liger_kernel is not applied: log-probs are already computed in chunks without "
            "full logits; liger's fused norm/MLP kernels are not wired in yet.")
    model = load_trainable_model(config, device=accelerator.device, attn_implementation=attention)
    lora = config.finetuning_type == "lora"
    frozen_reference = None
    if config.stage == "kto" and not lora:
        frozen_reference = copy.deepcopy(model).eval().requires_grad_(False)
    hidden_model = HiddenStates(model)
    head = hidden_model.causal_lm().get_output_embeddings()
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
    schedule = plan_schedule(len(train_set), config, accelerator.num_processes)
    warmup = config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * schedule.total_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=schedule.total_steps)
    hidden_model, optimizer = accelerator.prepare(hidden_model, optimizer)
    say(f"{len(train_set)} examples ({int(train_set.num_tokens.sum()):,} tokens), {schedule.total_steps} steps of "
        f"{schedule.global_batch_size} examples "
        f"({schedule.micro_batch_size} × {schedule.accumulation_steps} accumulation × {schedule.world_size} "
        f"processes), {sum(p.numel() for p in trainable):,} trainable parameters, attention {attention}")

    # --- resume ----------------------------------------------------------------------------------
    start_step = 0
    # What a checkpoint must have been trained on to be continued: the same tokens and, for KTO, the same
    # reference model (the log-probs of the steps run so far came from it).
    data_fingerprint = train_set.fingerprint if config.stage == "sft" else reference_key(config, train_set)
    if accelerator.num_processes > 1:  # the main process's: file times may differ between nodes' copies of a model
        from accelerate.utils import broadcast_object_list

        data_fingerprint = broadcast_object_list([data_fingerprint])[0]
    if resume_from is not None:
        state = checkpoints.read_state(resume_from)
        _check_resumable(state, schedule, config, resume_from, data_fingerprint)
        checkpoints.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                    rank=accelerator.process_index, lora=lora)
        start_step = state["step"]
        say(f"resumed from {resume_from} at step {start_step}")
    elif config.resume_from_checkpoint:
        say(f"resume_from_checkpoint: no checkpoint in {output_dir} yet: starting at step 0")

    # --- KTO reference log-probs: the examples of the steps still to run, and the eval split ----------
    reference_passes, reference_start = 0, time.perf_counter()
    if config.stage == "kto":
        splits = {"train": (train_set, examples_of_steps(schedule, config.seed, start_step))}
        if eval_set is not None:
            splits["eval"] = (eval_set, list(range(len(eval_set))))
        reference_passes = load_or_compute_reference(
            config, splits, lambda: _reference_forward(hidden_model, frozen_reference, accelerator),
            accelerator=accelerator, output_dir=output_dir,
            on_save=on_reference_saved,
        )
        frozen_reference = None  # the frozen copy of full fine-tuning is not needed after this
    reference_seconds = time.perf_counter() - reference_start

    tracker = Tracker(str(output_dir), config, resume_step=start_step if resume_from else None) if main else None
    if main:
        (output_dir / "run_config.yaml").write_text(config.to_yaml())

    # A run that raises closes its trackers as failed (an MLflow run is not left RUNNING).
    with tracker if tracker is not None else contextlib.nullcontext():
        # --- the loop --------------------------------------------------------------------------------
        progress = tqdm(total=schedule.total_steps, initial=start_step, desc="train", disable=not main,
                        dynamic_ncols=True)
        window = Window()
        totals = {"tokens": 0, "trained_tokens": 0, "step_seconds": 0.0}
        eval_every = config.eval_steps or config.logging_steps
        loop_start = time.perf_counter()
        hidden_model.train()
        for step in range(start_step, schedule.total_steps):
            step_start = time.perf_counter()
            indices = step_examples(schedule, config.seed, step)
            micro_batches = rank_micro_batches(indices, schedule, accelerator.process_index)
            if config.stage == "kto":
                sums = _kto_step(config, train_set, indices, micro_batches, hidden_model, head, accelerator)
            else:
                sums = _sft_step(train_set, indices, micro_batches, hidden_model, head, accelerator)
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm or float("inf"))
            optimizer.step()
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
                metrics = window.means(config.stage)
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
                window = Window()
            if eval_set is not None and _is_eval_step(config, done, eval_every, schedule):
                metrics = evaluate_split(config, eval_set, hidden_model, head, accelerator)
                if main:
                    tracker.log(done, metrics, split="eval")
                    progress.write(_metrics_line(done, schedule.total_steps, metrics, split="eval"))
                hidden_model.train()
            if done % config.save_steps == 0 or done == schedule.total_steps:
                _save_checkpoint(config, output_dir, done, schedule, model, optimizer, scheduler, accelerator,
                                 data_fingerprint)
                if on_checkpoint is not None:
                    on_checkpoint(done, output_dir / f"checkpoint-{done}", main)
        progress.close()

        # --- final outputs ---------------------------------------------------------------------------
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
            "peak_memory_bytes": _peak_memory_bytes(accelerator.device),
            "world_size": accelerator.num_processes,
        }
        if main:
            accelerator.unwrap_model(hidden_model).model.save_pretrained(str(output_dir))
            tokenizer.save_pretrained(str(output_dir))
            tracker.finish(results)  # writes train_results.json and the plots
            say(f"saved to {output_dir}: {results['num_steps']} steps, "
                f"{results['tokens_per_second']:.0f} tokens/s, peak memory {results['peak_memory_bytes'] / 2**30:.2f} GiB")
    accelerator.wait_for_everyone()
    return results


def _reference_forward(hidden_model, frozen_reference, accelerator):
    """A context giving the reference model's (HiddenStates, output head): the policy with its
    adapters disabled (LoRA: no second copy), or the frozen copy taken before training (full)."""
    @contextlib.contextmanager
    def reference():
        policy = accelerator.unwrap_model(hidden_model)
        was_training = policy.training
        policy.eval()
        try:
            if frozen_reference is not None:
                # The copy was taken before `accelerator.prepare`, which puts the policy's forward (not its
                # head) under autocast; the copy's forward gets the same, or a bf16 run's reference would
                # differ from the policy at step 0.
                frozen = HiddenStates(frozen_reference)
                frozen.forward = accelerator.autocast()(frozen.forward)
                yield frozen, frozen.causal_lm().get_output_embeddings()
            else:
                with policy.model.disable_adapter():
                    yield policy, policy.causal_lm().get_output_embeddings()
        finally:
            policy.train(was_training)

    return reference()


def _sft_step(examples: Examples, indices, micro_batches, hidden_model, head, accelerator) -> dict:
    """Forward and backward of one SFT optimizer step: loss = −Σ log p / (trained tokens of the step)."""
    world = accelerator.num_processes
    step_tokens = int(examples.num_trained_targets[indices].sum())
    sums = {"loss_sum": 0.0, "loss_count": 0.0, "tokens": 0.0, "trained_tokens": 0.0}
    for number, (chunk, weight) in enumerate(micro_batches):
        batch = examples.targets(chunk)
        with _sync_unless_last(accelerator, hidden_model, number, len(micro_batches)):
            _, per_token = sequence_logps(hidden_model, head, batch, accelerator.device)
            nll = -per_token.sum()
            accelerator.backward(nll * (weight * world / step_tokens))
        sums["loss_sum"] += float(nll.detach()) * weight
        sums["loss_count"] += batch.num_trained_tokens * weight
        sums["tokens"] += batch.num_tokens * weight
        sums["trained_tokens"] += batch.num_trained_tokens * weight
    return sums


def _kto_step(config: RunConfig, examples: Examples, indices, micro_batches, hidden_model, head, accelerator) -> dict:
    """Forward and backward of one KTO optimizer step.

    1. z0: the policy's log-probs of every KL pair of the step (no gradient), minus the reference's,
       averaged over the whole step (all micro-batches, all ranks) and clamped at 0.
    2. For each micro-batch: the policy's completion log-probs, the KTO loss of each example, summed
       and divided by the number of examples in the step (so the step's loss is their mean).

    With one micro-batch (no accumulation) its forward runs first and keeps the prompts' keys and values
    (PromptCache), so the KL pass runs only the partners' completions. With accumulation the KL pass must
    precede every backward, so it runs first, on whole KL pairs.
    """
    world, device = accelerator.num_processes, accelerator.device
    # No-grad passes run on the module DDP wraps: a DDP forward broadcasts buffers, a collective, and
    # ranks may run different numbers of KL passes (a rank whose micro-batch is a stand-in runs none).
    no_grad_model = accelerator.unwrap_model(hidden_model)
    paired = [chunk for chunk, weight in micro_batches if weight > 0]
    first_forward, cache = None, None  # (batch, policy log-probs) of the only micro-batch
    if len(micro_batches) == 1:  # true on every rank or on none: each rank's DDP forward comes first
        chunk, weight = micro_batches[0]
        cache = examples.prompt_cache(chunk, hidden_model) if weight > 0 else None
        batch = examples.targets(chunk)
        first_forward = batch, sequence_logps(hidden_model, head, batch, device, cache)[0]
    with torch.no_grad():
        if cache is not None:
            cache.mode = "extend"
            policy_kl = [sequence_logps(no_grad_model, head, examples.kl_continuations(paired[0]), device,
                                        cache)[0].cpu()]
            cache.mode, cache.layers = "off", {}  # e.g. gradient checkpointing's recompute ignores it
        else:
            policy_kl = [sequence_logps(no_grad_model, head, examples.kl_pairs(chunk), device)[0].cpu()
                         for chunk in paired]
        reference_kl = examples.reference_kl_logps[[i for chunk in paired for i in chunk]]
        reference_point = global_reference_point(policy_kl, reference_kl, accelerator).to(device)

    step_examples_count = len(indices)
    sums = dict.fromkeys(Window.KEYS, 0.0)
    sums.pop("grad_norm"), sums.pop("steps")
    for number, (chunk, weight) in enumerate(micro_batches):
        labels = examples.labels(chunk).to(device)
        with _sync_unless_last(accelerator, hidden_model, number, len(micro_batches)):
            if first_forward is None:
                batch = examples.targets(chunk)
                policy_logps = sequence_logps(hidden_model, head, batch, device)[0]
            else:
                batch, policy_logps = first_forward
            losses, rewards = kto_loss(
                policy_logps, examples.reference_logps[chunk].to(device), labels, reference_point,
                beta=config.pref_beta, chosen_weight=config.kto_chosen_weight,
                rejected_weight=config.kto_rejected_weight,
            )
            if config.pref_ftx > 0:  # an SFT term on desirable completions: mean token NLL, weighted
                num_targets = torch.tensor(examples.num_trained_targets[chunk], device=device)
                losses = losses + config.pref_ftx * labels * (-policy_logps / num_targets.clamp(min=1))
            accelerator.backward(losses.sum() * (weight * world / step_examples_count))
        for key, value in kto_sums(losses, rewards, policy_logps, labels, weight).items():
            sums[key] += value
        sums["tokens"] += batch.num_tokens * weight
        sums["trained_tokens"] += batch.num_trained_tokens * weight
    # Every rank adds the same z0; divided by the world size, the all-reduce gives it back once.
    sums["kl"] = float(reference_point) / world
    return sums


def _sync_unless_last(accelerator, model, number: int, count: int):
    """DDP all-reduces gradients in every backward; skip it for all but the step's last micro-batch."""
    return contextlib.nullcontext() if number == count - 1 else accelerator.no_sync(model)


@torch.no_grad()
def evaluate_split(config: RunConfig, examples: Examples, hidden_model, head, accelerator) -> dict:
    """Held-out metrics. SFT: mean token NLL. KTO: the loss with z0 over all eval KL pairs, the
    rewards, and `rewards/accuracy`, the share of examples whose implied reward has their label's sign."""
    hidden_model.eval()
    model = accelerator.unwrap_model(hidden_model)  # ranks may run different numbers of forwards (see _kto_step)
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    chunks = batches_of(mine, config.per_device_eval_batch_size)
    window = Window()
    if config.stage == "sft":
        for chunk in chunks:
            batch = examples.targets(chunk)
            _, per_token = sequence_logps(model, head, batch, accelerator.device)
            window.add({"loss_sum": float(-per_token.sum()), "loss_count": batch.num_trained_tokens})
        window.sums = reduce_sums(window.sums, accelerator)
        return window.means("sft")
    policy_kl = [sequence_logps(model, head, examples.kl_pairs(chunk), accelerator.device)[0].cpu()
                 for chunk in chunks]
    policy_logps = [sequence_logps(model, head, examples.targets(chunk), accelerator.device)[0].cpu()
                    for chunk in chunks]
    reference_point = global_reference_point(  # z0 over every eval KL pair
        policy_kl, examples.reference_kl_logps[mine], accelerator)
    for chunk, logps in zip(chunks, policy_logps):
        labels = examples.labels(chunk)
        losses, rewards = kto_loss(logps, examples.reference_logps[chunk], labels, reference_point,
                                   beta=config.pref_beta, chosen_weight=config.kto_chosen_weight,
                                   rejected_weight=config.kto_rejected_weight)
        window.add(kto_sums(losses, rewards, logps, labels))
    window.sums = reduce_sums(window.sums, accelerator)
    window.sums["kl"], window.sums["steps"] = float(reference_point), 1
    metrics = window.means("kto")
    metrics["rewards/accuracy"] = window.sums["correct_sign"] / len(examples)
    return metrics


def _is_eval_step(config: RunConfig, done: int, eval_every: int, schedule: Schedule) -> bool:
    if config.eval_strategy == "no":
        return False
    if done == schedule.total_steps:
        return True
    if config.eval_strategy == "epoch":
        return done % schedule.steps_per_epoch == 0
    return done % eval_every == 0


def _save_checkpoint(config, output_dir: Path, step: int, schedule: Schedule, model, optimizer, scheduler,
                     accelerator, data_fingerprint: str) -> None:
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
    }
    if accelerator.is_main_process:
        checkpoints.write_main_files(folder, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
    accelerator.wait_for_everyone()
    checkpoints.write_rng_state(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.publish(folder, step, config.save_total_limit)
    accelerator.wait_for_everyone()


def _check_resumable(state: dict, schedule: Schedule, config: RunConfig, folder: Path, data_fingerprint: str) -> None:
    """The data, its order and the schedule depend on these; resuming with other values would not
    continue the run (and KTO would mix reference log-probs of other sequences)."""
    if "data_fingerprint" not in state:
        raise UserError(f"resume_from_checkpoint: {folder} was written by an earlier prospect, which did not record "
                        "the data it trained on; start a new run in another output_dir.")
    expected = {"seed": config.seed, "num_examples": schedule.num_examples,
                "global_batch_size": schedule.global_batch_size, "total_steps": schedule.total_steps,
                "stage": config.stage, "cutoff_len": config.cutoff_len}
    changed = [f"{key} {state.get(key)} → {value}" for key, value in expected.items() if state.get(key) != value]
    if state.get("data_fingerprint") != data_fingerprint:
        changed.append("the training data's tokens (data files, template, truncation or tokenizer)"
                       + (" or the KTO reference model (model, adapters, precision)" if config.stage == "kto" else ""))
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
