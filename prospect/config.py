"""The run configuration: one flat, typed set of keys, read from YAML/JSON plus `key=value` overrides.

The keys and their meanings follow LLaMA-Factory v0.9.3 so that its users' YAML files work unchanged
(the compatibility contract; examples/README.md lists every key). Every field has a default and a one-line doc (`help`); unknown keys, wrong types and
out-of-range values raise `UserError` naming the key, the value and what is allowed. Rules that tie
several fields together live in `RunConfig.validate`, grouped by the section they concern.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from prospect.errors import UserError
from prospect.sharding import fsdp_options

EMBEDDED_MODEL = "smollm2-135m-instruct"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and its one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    # --- model -----------------------------------------------------------------------------
    model_name_or_path: str = _f(
        EMBEDDED_MODEL,
        "Base model: a local Hugging Face folder, a .gguf file, a hub id, or "
        f"`{EMBEDDED_MODEL}` (the embedded default model).",
    )
    adapter_name_or_path: str | None = _f(
        None, "LoRA adapter folder(s), a comma list: train merges all but the last into the base and continues the "
        "last; chat, serve and eval apply them all.",
    )
    trust_remote_code: bool = _f(False, "Allow model/tokenizer code shipped with the model folder.")
    quantization_bit: int | None = _f(
        None, "QLoRA: load the frozen base in 4 or 8 bits (bitsandbytes, `pip install 'prospect[qlora]'`); train, "
        "chat, serve and eval load it so, export merges into the full-precision base.",
        choices=(4, 8),
    )
    quantization_method: Literal["bnb"] = _f("bnb", "How the base is quantized: bnb = bitsandbytes (the only one).")
    quantization_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type of quantization_bit: 4 (bitsandbytes).")
    double_quantization: bool = _f(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/weight).")
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = _f(
        "auto", "Attention of packed batches: fa2 = flash-attention 2's variable-length kernel (CUDA, bf16/fp16; the "
        "flash-attn package's, else PyTorch's own; else exit 2); sdpa = PyTorch SDPA per sequence; auto = the "
        "flash-attn package where installed, else sdpa; disabled = the model's eager attention.",
    )
    enable_liger_kernel: bool = _f(
        False, "liger-kernel's fused RMSNorm, SwiGLU and RoPE in training (CUDA and `pip install liger-kernel`, "
        "else exit 2); log-probs already avoid full logits."
    )
    torch_compile: bool = _f(
        False, "Compile each decoder layer with torch.compile (slow first step; can save activation memory)."
    )
    cache_dir: str | None = _f(
        None, "Cache for converted models and tokenized datasets (default $PROSPECT_CACHE_DIR or ~/.cache/prospect)."
    )

    # --- method ----------------------------------------------------------------------------
    stage: Literal["sft", "kto"] = _f("sft", "Training objective: supervised fine-tuning or KTO.")
    do_train: bool = _f(True, "LLaMA-Factory's switch: prospect train trains; false is refused (use prospect eval).")
    do_eval: bool | None = _f(
        None, "Evaluate during training: default when val_size or eval_dataset is set; false only holds the split out "
        "(as eval_strategy: no)."
    )
    finetuning_type: Literal["lora", "full"] = _f("lora", "Train LoRA adapters or all weights.")
    lora_rank: int = _f(8, "LoRA rank r of a new adapter (a continued adapter keeps its own; another value is refused).",
                        min=1)
    lora_alpha: int | None = _f(None, "LoRA scaling alpha (default 2 × lora_rank).", min=1)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    lora_target: list[str] = _f(
        ["all"], "Modules that get adapters: `all` (every linear layer but the output head) or a comma list."
    )
    pref_beta: float = _f(0.1, "KTO β: the implied reward is β·log(π/π_ref) (stage kto only).", min=0.0,
                          exclusive_min=True)
    pref_ftx: float = _f(
        0.0, "KTO: weight of a mean-token NLL term added on desirable examples (stage kto only).", min=0.0
    )
    kto_chosen_weight: float = _f(1.0, "KTO λ_D: weight of desirable examples (stage kto only).", min=0.0,
                                  exclusive_min=True)
    kto_rejected_weight: float = _f(
        1.0, "KTO λ_U: weight of undesirable examples (stage kto only).", min=0.0, exclusive_min=True
    )
    deepspeed: str | None = _f(
        None, "DeepSpeed JSON config (ZeRO stage 1-3, \"auto\" values filled from this YAML; no optimizer/scheduler "
        "sections): shard with DeepSpeed over ≥ 2 processes; unset = DDP.")
    fsdp: str | None = _f(None, "Shard the model over the processes with PyTorch FSDP2 (HF Trainer's spelling): "
                          "full_shard (weights, gradients, optimizer state) or shard_grad_op (not weights), + offload "
                          "(CUDA); unset = DDP.")

    # --- dataset ---------------------------------------------------------------------------
    dataset: list[str] = _f([], "Datasets to train on: names in dataset_info.json or file paths (comma list).")
    eval_dataset: list[str] = _f([], "Datasets to evaluate on (comma list); otherwise val_size splits one off.")
    dataset_dir: str = _f("data", "Folder holding dataset_info.json and the data files.")
    template: str | None = _f(None, "Chat template: llama3, qwen, chatml, or auto/unset = the tokenizer's own.")
    default_system: str | None = _f(None, "System prompt used when a conversation has none.")
    cutoff_len: int = _f(
        2048, "Maximum tokens per example (SFT keeps the first ones; KTO: see truncation_mode).", min=1
    )
    truncation_mode: Literal["keep_end", "keep_start"] | None = _f(
        None, "KTO, an example over cutoff_len: keep_end (default) drops the oldest prompt turns and cuts the "
        "completion's end, dropping no example; keep_start keeps the first cutoff_len tokens.",
    )
    max_samples: int | None = _f(None, "Use at most the first N records of each dataset.", min=1)
    val_size: float = _f(0.0, "Held-out split: a fraction in (0, 1) or a number of examples.", min=0.0)
    train_on_prompt: bool = _f(False, "SFT: also train on prompt (user/system/observation) tokens.")
    mask_history: bool = _f(False, "SFT: train only on the last assistant turn of each conversation.")
    overwrite_cache: bool = _f(False, "Rebuild the tokenized-dataset cache.")
    preprocessing_num_workers: int | None = _f(None, "Processes used to tokenize datasets.", min=1)
    on_bad_record: Literal["error", "skip"] = _f(
        "error", "A malformed record stops the run (error) or is skipped and reported (skip)."
    )

    # --- output ----------------------------------------------------------------------------
    output_dir: str = _f("saves/run", "Where adapters, checkpoints, metrics and plots are written.")
    overwrite_output_dir: bool = _f(
        False, "Reuse a non-empty output_dir: the previous run's outputs are removed, other files (and KTO "
        "reference log-probs, reused when they match) are kept."
    )
    logging_steps: int = _f(10, "Log metrics every N optimizer steps.", min=1)
    save_steps: int = _f(500, "Save a checkpoint every N optimizer steps.", min=1)
    save_total_limit: int | None = _f(None, "Keep only the newest N checkpoints.", min=1)
    plot_loss: bool = _f(False, "Write training_loss.png (and KTO reward/KL plots) at the end.")
    report_to: list[str] = _f(["none"], "Trackers: none, mlflow, tensorboard, wandb (comma list).")
    resume_from_checkpoint: str | None = _f(
        None, "Checkpoint folder to resume from, or `true` for the latest in output_dir (none yet after a stop "
        "during KTO's reference pass: starts at step 0, reusing it).",
    )

    # --- training --------------------------------------------------------------------------
    per_device_train_batch_size: int = _f(8, "Micro-batch size per device.", min=1)
    per_device_eval_batch_size: int = _f(8, "Batch size per device of evaluation and of KTO's reference pass.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", min=1)
    num_train_epochs: float = _f(3.0, "Passes over the training data.", min=0.0, exclusive_min=True)
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    learning_rate: float = _f(5e-5, "Peak learning rate of AdamW.", min=0.0, exclusive_min=True)
    weight_decay: float = _f(0.0, "AdamW weight decay.", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _f(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = _f(0.0, "Fraction of steps spent warming up linearly.", min=0.0, max=1.0)
    warmup_steps: int = _f(0, "Warm-up steps (overrides warmup_ratio when > 0).", min=0)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 = no clipping).", min=0.0)
    bf16: bool = _f(False, "Train in bfloat16 mixed precision.")
    fp16: bool = _f(False, "Train in float16 mixed precision (CUDA only).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    seed: int = _f(42, "Seed for initialisation, data order and splits.")
    eval_strategy: Literal["no", "steps", "epoch"] | None = _f(
        None, "When to evaluate during training: steps (every eval_steps), epoch or no; default steps when "
        "there is held-out data, else no.",
    )
    eval_steps: int | None = _f(None, "Evaluate every N optimizer steps (default: logging_steps).", min=1)
    eval_pattern: str | None = _f(
        None, "Regex that `prospect eval` counts in greedy replies to the eval prompts, base model vs trained."
    )
    ddp_timeout: int = _f(1800, "Seconds a collective operation waits before failing (torchrun and Ray).", min=1)

    # --- ray -------------------------------------------------------------------------------
    ray_run_name: str | None = _f(None, "Name of the run folder under ray_storage_path.")
    ray_storage_path: str = _f("./saves", "Shared storage for Ray checkpoints: local path or a pyarrow URI.")
    ray_num_workers: int = _f(1, "Ray Train workers (one per GPU); > 1 runs on Ray.", min=1)
    resources_per_worker: dict = _f({}, "Resources each Ray worker asks for, e.g. {GPU: 1}.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", "How Ray places workers on nodes."
    )
    ray_init_kwargs: dict = _f({}, "Arguments passed to ray.init (e.g. runtime_env.env_vars).")
    ray_address: str | None = _f(None, "Address of an existing Ray cluster (default $RAY_ADDRESS).")
    ray_max_failures: int = _f(0, "Times Ray restarts the worker group after a failure.", min=0)

    # --- export ----------------------------------------------------------------------------
    export_dir: str | None = _f(None, "Where `prospect export` writes the merged model.")
    export_size: float = _f(
        5, "Largest shard of the exported model in GB (a fraction such as 0.5 is allowed).", min=0.0, exclusive_min=True
    )
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype of the exported weights (auto: the training dtype; bf16 where fp32 was only for CPU)."
    )
    export_overwrite: bool = _f(False, "Let `prospect export` replace a non-empty export_dir.")

    # --- inference (chat, serve, eval) ---------------------------------------------------------
    infer_backend: Literal["huggingface"] = _f(
        "huggingface", "Inference engine (LLaMA-Factory key; only huggingface is available here)."
    )
    infer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype for chat, serve and eval (auto: float32 on CPU; bfloat16, else float16, on a GPU)."
    )
    max_new_tokens: int = _f(512, "Most tokens generated per reply (the server's default for max_tokens).", min=1)
    temperature: float = _f(
        0.95, "Sampling temperature for chat and serve; 0 = greedy (always the likeliest token).", min=0.0
    )
    top_p: float = _f(0.7, "Nucleus sampling: sample among the likeliest tokens holding this much probability.",
                      min=0.0, max=1.0, exclusive_min=True)
    host: str = _f("127.0.0.1", "Address `prospect serve` listens on (0.0.0.0 = every interface).")
    port: int = _f(8000, "Port `prospect serve` listens on (0 = any free port, printed at start).", min=0, max=65535)
    api_key: str | None = _f(None, "If set (or $PROSPECT_API_KEY), clients must send `Authorization: Bearer <api_key>`.")
    serve_batch_size: int = _f(8, "Most queued requests `prospect serve` generates together in one batch.", min=1)
    feedback_dir: str | None = _f(None, "`prospect serve`: POST /v1/feedback appends thumbs up/down here as a KTO "
                                  "dataset (dataset: feedback, dataset_dir: this); unset = no feedback.")

    # ---------------------------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Rules that tie fields together; each error names the fields and how to fix them."""
        # method
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if self.finetuning_type == "full" and self.adapter_name_or_path:
            raise UserError("adapter_name_or_path needs finetuning_type: lora (full fine-tuning has no adapters).")
        if self.quantization_bit is not None and self.finetuning_type != "lora":
            raise UserError("quantization_bit needs finetuning_type: lora (quantized weights cannot be trained).")
        if self.quantization_bit != 4 and (self.quantization_type != "nf4" or not self.double_quantization):
            raise UserError("quantization_type and double_quantization apply to quantization_bit: 4: set it, or remove "
                            "them.")
        fsdp_options(self.fsdp)
        # dataset
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise UserError(
                f"val_size: {self.val_size} is not allowed: use a fraction in (0, 1) or a whole number of examples."
            )
        # Keys of one objective, set for the other: refused rather than silently ignored.
        other_stage_keys = {"sft": ("pref_beta", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight"),
                            "kto": ("train_on_prompt", "mask_history")}[self.stage]
        set_here = [key for key in other_stage_keys if getattr(self, key) != FIELDS[key].default]
        if set_here:
            other = "kto" if self.stage == "sft" else "sft"
            raise UserError(f"{', '.join(set_here)} only apply to stage: {other}, but stage is {self.stage}: "
                            f"remove {'it' if len(set_here) == 1 else 'them'} (or set stage: {other}).")
        if self.stage == "kto" and self.truncation_mode is None:
            self.truncation_mode = "keep_end"
        if self.stage == "sft" and self.truncation_mode == "keep_end":
            raise UserError(
                "truncation_mode: keep_end applies to stage: kto; SFT always keeps the first cutoff_len tokens "
                "(the turns it trains on need the conversation before them). Remove the key."
            )
        if self.template is not None and self.template.lower() == "auto":
            self.template = None
        # training
        if self.bf16 and self.fp16:
            raise UserError("bf16 and fp16 are both true: choose one mixed-precision mode.")
        if self.warmup_ratio >= 1:
            raise UserError(f"warmup_ratio: {self.warmup_ratio} is not allowed: use a fraction in [0, 1).")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"max_steps: {self.max_steps} is not allowed: use a positive number, or -1 for epochs.")
        has_eval_data = self.val_size > 0 or bool(self.eval_dataset)
        if self.do_eval is False and (self.eval_strategy not in (None, "no") or self.eval_steps):
            raise UserError("do_eval: false, but eval_strategy / eval_steps ask for evaluations: remove one of them.")
        asking = [key for key, asks in (("do_eval: true", self.do_eval),
                                        (f"eval_strategy: {self.eval_strategy}", self.eval_strategy in ("steps", "epoch")),
                                        ("eval_steps", self.eval_steps)) if asks]
        if asking and not has_eval_data:
            raise UserError(f"{' and '.join(asking)} {'needs' if len(asking) == 1 else 'need'} held-out data: "
                            "set val_size (e.g. 0.1) or eval_dataset.")
        if self.eval_strategy is None:
            self.eval_strategy = "steps" if has_eval_data and self.do_eval is not False else "no"
        # output
        if self.report_to == [] or "none" in self.report_to:
            self.report_to = [t for t in self.report_to if t != "none"] or ["none"]
            if len(self.report_to) > 1:
                self.report_to.remove("none")
        for tracker in self.report_to:
            if tracker not in ("none", "mlflow", "tensorboard", "wandb"):
                raise UserError(f"report_to: {tracker!r} is not allowed: use none, mlflow, tensorboard or wandb "
                                "(comma list).")
        return self

    @property
    def uses_ray(self) -> bool:
        """As in LLaMA-Factory: USE_RAY=1 in the environment, or more than one Ray worker."""
        return os.environ.get("USE_RAY", "0").lower() in ("1", "true", "yes") or self.ray_num_workers > 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def adapter_paths(value: str | None) -> list[str]:
    """`adapter_name_or_path` as training reads it: a comma list of folders; all but the last are merged
    into the base, the last is trained further."""
    return [path.strip() for path in (value or "").split(",") if path.strip()]


def field_docs() -> list[tuple[str, str, str]]:
    """(key, default, help) of every config key, for the README table and `--help`."""
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(RunConfig)}
    return [(name, json.dumps(default), FIELDS[name].metadata["help"]) for name, default in defaults.items()]


# --- reading ---------------------------------------------------------------------------------


def load_config(path: str | None, overrides: list[str] = (), *, where: str | None = None) -> RunConfig:
    """Read a YAML/JSON config file, apply `key=value` overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    source = where or (os.path.basename(path) if path else "command line")
    if path is not None:
        raw = _read_file(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override {item!r} is not key=value (e.g. learning_rate=1e-4).")
        raw[key.strip()] = _parse_scalar(text)
    return build_config(raw, source=source)


def build_config(raw: dict[str, Any], *, source: str = "config") -> RunConfig:
    values = {}
    for key, value in raw.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{source}: unknown config key {key!r}{hint} (every key is listed in examples/README.md)."
            )
        values[key] = _coerce(key, value, FIELDS[key], source)
    return RunConfig(**values).validate()


def _read_file(path: str) -> dict[str, Any]:
    import yaml

    if not os.path.isfile(path):
        raise UserError(f"config file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{path}: {where}not valid YAML: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of key: value, got {type(data).__name__}.")
    return data


def _parse_scalar(text: str) -> Any:
    """Command-line values are parsed as YAML (so `true`, `1e-4`, `{GPU: 1}` mean what they look like)."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text


def _coerce(key: str, value: Any, f: dataclasses.Field, source: str) -> Any:
    """Check `value` against the field's annotated type and range; return it in that type."""
    annotation = _type_hints()[key]
    optional, base = _unwrap_optional(annotation)

    def bad(allowed: str) -> UserError:
        return UserError(f"{source}: {key}: {value!r} is not allowed: expected {allowed}.")

    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none") and optional):
        if optional:
            return None
        if key == "resume_from_checkpoint":
            return None
        raise bad(_describe(base))
    if key == "resume_from_checkpoint":
        # A path, or a boolean meaning "the latest complete checkpoint in output_dir" / "no resume".
        if isinstance(value, bool):
            return "true" if value else None
        if isinstance(value, str):
            return "true" if value.strip().lower() == "true" else (None if value.strip().lower() == "false" else value)
        raise bad("a checkpoint path or true")
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if isinstance(value, bool) and ("yes" if value else "no") in choices:  # YAML 1.1 reads `no` as false
            return "yes" if value else "no"
        for choice in choices:
            if isinstance(value, str) and value.lower() == str(choice).lower():
                return choice
        raise bad("one of " + ", ".join(map(str, choices)))
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _is_int(value))):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad(_describe(base, f))
        value = int(value)
        _check_range(value, f, bad)
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            raise bad("one of " + ", ".join(map(str, f.metadata["choices"])))
        return value
    if base is float:
        if isinstance(value, bool):
            raise bad(_describe(base, f))
        try:
            value = float(value)  # YAML 1.1 reads `1e-4` as a string; LLaMA-Factory users write it.
        except (TypeError, ValueError):
            raise bad(_describe(base, f)) from None
        _check_range(value, f, bad)
        return value
    if base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if origin is list:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            raise bad("a comma-separated string or a list of strings")
        return [v for v in items if v]
    if base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad("a mapping (YAML or JSON object)") from None
        if not isinstance(value, dict):
            raise bad("a mapping (YAML or JSON object)")
        return value
    raise AssertionError(f"config field {key} has an unsupported annotation {annotation}")


_HINTS: dict[str, Any] = {}


def _type_hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(RunConfig))
    return _HINTS


def _unwrap_optional(annotation: Any) -> tuple[bool, Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(args) == 1, f"config fields are T or T | None, got {annotation}"
        return True, args[0]
    return False, annotation


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _describe(base: Any, f: dataclasses.Field | None = None) -> str:
    name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, str(base))
    if f is not None:
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if lo is not None and hi is not None:
            name += f" in [{lo}, {hi}]"
        elif lo is not None:
            name += f" > {lo}" if f.metadata.get("exclusive_min") else f" >= {lo}"
    return name


def _check_range(value: float, f: dataclasses.Field, bad) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    base = int if isinstance(value, int) else float
    if lo is not None and (value < lo or (f.metadata.get("exclusive_min") and value == lo)):
        raise bad(_describe(base, f))
    if hi is not None and value > hi:
        raise bad(_describe(base, f))
