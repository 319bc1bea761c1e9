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
import hashlib
import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prospect import checkpoints
from prospect.config import RunConfig
from prospect.data.encode import IGNORE_INDEX
from prospect.data.pipeline import prepare_data
from prospect.data.report import balance_advice, kto_balance
from prospect.errors import UserError
from prospect.losses import kl_partners, kto_loss, kto_reference_point, token_logps
from prospect.model import load_tokenizer, load_trainable_model
from prospect.packing import PACKED_ATTENTION, PackedBatch, PromptCache, pack, packed_attention_implementation

REFERENCE_FILE = "reference_logps.safetensors"


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


def step_examples(schedule: Schedule, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based), the same on every rank: each
    epoch is a permutation of the dataset drawn from (seed, epoch)."""
    epoch, position = divmod(step, schedule.steps_per_epoch)
    order = list(range(schedule.num_examples))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    start = position * schedule.global_batch_size
    return order[start : start + schedule.global_batch_size]


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
        labels = dataset.data.column("labels").combine_chunks()
        flat, offsets = labels.flatten().to_numpy(), labels.offsets.to_numpy()
        trained = np.add.reduceat((flat != IGNORE_INDEX).astype(np.int64), offsets[:-1])
        first_trained = flat[offsets[:-1]] != IGNORE_INDEX  # the first token has no predecessor to predict it
        self.num_trained_targets = trained - first_trained  # [N] tokens that carry loss
        self.num_tokens = np.diff(offsets)  # [N]
        self.partners: list[int] | None = None
        self.reference_logps: torch.Tensor | None = None  # [N] summed completion log-probs
        self.reference_kl_logps: torch.Tensor | None = None  # [N] the same for each KL pair
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
        cannot be used: an attention backend other than prospect_packed, or a prompt of 0 tokens or
        longer than cutoff_len."""
        model = getattr(hidden_model, "module", hidden_model)  # DDP wraps the HiddenStates module
        if model.causal_lm().config._attn_implementation != PACKED_ATTENTION:
            return None
        prompt_lens = self.dataset[indices]["prompt_len"]
        if not prompt_lens or min(prompt_lens) < 1 or max(prompt_lens) > self.cutoff_len:
            return None
        return PromptCache([n - 1 for n in prompt_lens])

    def fingerprint(self) -> str:
        """A hash of the token ids, labels and KL pairing: what the reference log-probs depend on."""
        h = hashlib.sha256()
        for name in ("input_ids", "labels", "prompt_len"):
            for chunk in self.dataset.data.column(name).chunks:
                for buffer in chunk.buffers():
                    if buffer is not None:
                        h.update(buffer)
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
# KTO reference log-probs: computed once


@torch.no_grad()
def compute_reference_logps(examples: Examples, hidden_model, head, *, accelerator, batch_size: int,
                            desc: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reference log-probs of every example's completion and KL pair, [N] each, on every rank.

    Ranks split the examples and sum their parts with one all-reduce. Returns also how many packed
    forward passes this rank ran (tests count them: the reference must run once per run)."""
    from tqdm.auto import tqdm

    n = len(examples)
    logps = torch.zeros(n, device=accelerator.device)
    kl_logps = torch.zeros(n, device=accelerator.device)
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    passes = 0
    for chunk in tqdm(batches_of(mine, batch_size), desc=desc, disable=not accelerator.is_main_process,
                      leave=False, dynamic_ncols=True):
        index = torch.tensor(chunk, device=accelerator.device)
        cache = examples.prompt_cache(chunk, hidden_model)  # the KL pass reuses the targets' prompts
        logps[index] = sequence_logps(hidden_model, head, examples.targets(chunk), accelerator.device, cache)[0]
        if cache is not None:
            cache.mode = "extend"
        kl_batch = examples.kl_pairs(chunk) if cache is None else examples.kl_continuations(chunk)
        kl_logps[index] = sequence_logps(hidden_model, head, kl_batch, accelerator.device, cache)[0]
        passes += 2
    if accelerator.num_processes > 1:
        logps, kl_logps = accelerator.reduce(logps, "sum"), accelerator.reduce(kl_logps, "sum")
    return logps.cpu(), kl_logps.cpu(), passes


def reference_key(config: RunConfig, splits: dict[str, Examples]) -> str:
    """What the reference log-probs depend on: the model, the starting adapter, the tokens, the
    pairing and the precision."""
    parts = {
        "model": config.model_name_or_path,
        "adapter": config.adapter_name_or_path,
        "finetuning_type": config.finetuning_type,
        "bf16": config.bf16,
        "fp16": config.fp16,
        "splits": {name: examples.fingerprint() for name, examples in splits.items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_or_compute_reference(config, splits: dict[str, Examples], make_reference, *, accelerator,
                              output_dir: Path) -> int:
    """Fill each split's reference log-probs from output_dir/reference_logps.safetensors when its key
    matches, else compute them (`make_reference()` is a context giving the reference model's
    (HiddenStates, output head)) and store them there. Returns the number of reference forward
    passes run."""
    from safetensors.torch import load_file, save_file

    path = output_dir / REFERENCE_FILE
    key = reference_key(config, splits)
    stored_key = None
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored_key = (f.metadata() or {}).get("key")
    # Computing is collective (an all-reduce), so all ranks must take the same branch: one rank whose
    # node-local output_dir lacks the file (Ray across nodes) makes every rank compute.
    if reduce_sums({"found": float(stored_key == key)}, accelerator)["found"] == accelerator.num_processes:
        tensors = load_file(str(path))
        for name, examples in splits.items():
            examples.reference_logps = tensors[f"{name}_logps"]
            examples.reference_kl_logps = tensors[f"{name}_kl_logps"]
        return 0
    passes = 0
    with make_reference() as (reference_model, reference_head):
        for name, examples in splits.items():
            examples.reference_logps, examples.reference_kl_logps, n = compute_reference_logps(
                examples, reference_model, reference_head, accelerator=accelerator,
                batch_size=config.per_device_eval_batch_size, desc=f"reference log-probs ({name})",
            )
            passes += n
    if accelerator.is_main_process:
        tensors = {}
        for name, examples in splits.items():
            tensors[f"{name}_logps"] = examples.reference_logps.contiguous()
            tensors[f"{name}_kl_logps"] = examples.reference_kl_logps.contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(path)
    accelerator.wait_for_everyone()
    return passes


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


def train(config: RunConfig, *, on_checkpoint=None) -> dict:
    """Train as `config` says; return the contents of train_results.json.

    `on_checkpoint(step, folder, is_main)`, if given, runs on every rank once checkpoint-<step> is
    complete (Ray workers use it to hand the checkpoint to Ray Train, see prospect/ray_launch.py)."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from prospect.tracking import Tracker

    if config.fp16 and not torch.cuda.is_available():
        raise UserError("fp16: true needs a CUDA GPU; on CPU train in float32 (bf16: false) or bf16: true.")
    if config.deepspeed and not torch.cuda.is_available():
        raise UserError(f"deepspeed: {config.deepspeed} needs CUDA GPUs; remove the key to train on CPU.")
    if config.quantization_bit is not None and not torch.cuda.is_available():
        raise UserError("quantization_bit needs a CUDA GPU (bitsandbytes); remove the key to train on CPU.")
    # Accelerate keeps its settings in a process-wide singleton; a new run (a test, a restarted Ray
    # worker) must not inherit the last run's mixed precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True without CUDA: Accelerate joins a CPU (gloo) process group under torchrun only when told.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if config.bf16 else "fp16" if config.fp16 else "no")
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
    if data.eval is not None and len(data.eval) > 0:
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
    say(f"{len(train_set)} examples, {schedule.total_steps} steps of {schedule.global_batch_size} examples "
        f"({schedule.micro_batch_size} × {schedule.accumulation_steps} accumulation × {schedule.world_size} "
        f"processes), {sum(p.numel() for p in trainable):,} trainable parameters, attention {attention}")

    # --- KTO reference log-probs, once -----------------------------------------------------------
    reference_passes, reference_start = 0, time.perf_counter()
    if config.stage == "kto":
        splits = {"train": train_set, **({"eval": eval_set} if eval_set is not None else {})}
        reference_passes = load_or_compute_reference(
            config, splits, lambda: _reference_forward(hidden_model, frozen_reference, accelerator),
            accelerator=accelerator, output_dir=output_dir,
        )
        frozen_reference = None  # the frozen copy of full fine-tuning is not needed after this
    reference_seconds = time.perf_counter() - reference_start

    # --- resume ----------------------------------------------------------------------------------
    start_step = 0
    if resume_from is not None:
        state = checkpoints.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler,
                                            rank=accelerator.process_index, lora=lora)
        _check_resumable(state, schedule, config, resume_from)
        start_step = state["step"]
        say(f"resumed from {resume_from} at step {start_step}")

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
                _save_checkpoint(config, output_dir, done, schedule, model, optimizer, scheduler, accelerator)
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
                frozen = HiddenStates(frozen_reference)
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
                     accelerator) -> None:
    folder = checkpoints.temporary_folder(str(output_dir), step)
    state = {
        "step": step,
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


def _check_resumable(state: dict, schedule: Schedule, config: RunConfig, folder: Path) -> None:
    """The data order and schedule depend on these; resuming with other values would not continue the run."""
    expected = {"seed": config.seed, "num_examples": schedule.num_examples,
                "global_batch_size": schedule.global_batch_size, "total_steps": schedule.total_steps,
                "stage": config.stage}
    changed = [f"{key} {state.get(key)} → {value}" for key, value in expected.items() if state.get(key) != value]
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
