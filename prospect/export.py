"""`prospect export`: merge LoRA adapters into the base model and write a plain Hugging Face model.

The result loads with `AutoModelForCausalLM.from_pretrained(export_dir)` and nothing else: no PEFT,
no prospect. What is written:

- the merged weights as safetensors shards of at most `export_size` GB, with their index
  (`model.safetensors.index.json`) when there is more than one shard;
- `config.json` and `generation_config.json` (whose eos ids include the template's end-of-turn
  token, so that plain `generate` stops where the model learned to stop);
- the tokenizer, with the chat template the adapter was *trained* with: a named template (`qwen`,
  `llama3`, `chatml`) is written as an equivalent Jinja template unless the tokenizer's own one
  already renders identically; `auto` keeps the tokenizer's own (wrapped to add `default_system`
  when one was used).

Adapters (`adapter_name_or_path`, one or a comma list) are merged in order. The merge is done in
float32 whatever the export dtype, so rounding happens once, when the merged weights are cast.

Dtype (`export_dtype: auto`): the dtype the adapter was trained in (bf16 / fp16 from the run's
run_config.yaml, or from this config when there is none); when training ran in float32 — as it
does on CPU — the base checkpoint's own dtype (a bf16 model comes back as bf16: fp32 was only the
CPU's choice, not a property of the model); float32 when the base itself is float32 (the
embedded GGUF model, whose dequantised weights are exact in float32 only).

Checks, which fail the export loudly (nothing is left in `export_dir`) when they do not hold:

1. merge: on a few rendered prompts, the merged float32 model's logits equal the base+adapters
   model's (tolerance 1e-4 × max(1, largest |logit|));
2. files: the export, reloaded with plain transformers, holds exactly the merged weights cast to
   the export dtype, every tensor (catches missing, misnamed or mis-tied tensors);
3. end to end: the reloaded export's logits match base+adapters within a tolerance by dtype
   (float32 1e-4, float16 1e-2, bfloat16 5e-2, relative to max(1, largest |logit|)), and the
   saved tokenizer's chat template renders the probe conversations exactly as the training
   template. The reload is computed in float32 (half-precision weights upcast, exactly), so the
   difference measured is what the export did — merge and rounding of the weights — and not the
   noise of half-precision arithmetic on whatever machine runs the check.

The export is written to a temporary sibling folder and moved into place only after the checks
pass; `export_overwrite: true` is needed to replace a non-empty `export_dir`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

from prospect.data.example import Message
from prospect.data.templates import chat_template_jinja
from prospect.data.tool_calls import to_hf_messages, to_hf_tools
from prospect.errors import UserError

# Largest |difference| allowed between two sets of logits, as a fraction of max(1, largest |logit|).
MERGE_TOLERANCE = 1e-4
END_TO_END_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}

# What the checks feed the model and the saved chat template.
PROBE_CONVERSATIONS = [
    [Message("user", "Hello! Who are you?")],
    [
        Message("system", "You answer in one short sentence."),
        Message("user", "What is the capital of France?"),
        Message("assistant", "Paris."),
        Message("user", "And of Italy? Ça va ?"),
    ],
    [Message("user", "Write a haiku about rivers.")],
]
PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
PROBE_TOOL_CONVERSATION = [
    Message("user", "Weather in Zürich?"),
    Message("function_call", json.dumps({"name": "get_weather", "arguments": {"city": "Zürich"}})),
    Message("observation", '{"temp_c": 21}'),
    Message("assistant", "It is 21 °C in Zürich."),
]


def _probe_set(template) -> list[tuple[list[Message], list[dict], str]]:
    """(messages, tools, text as the training template renders it) for the conversations the saved
    chat template must reproduce. Conversations the training template itself refuses (say, a
    tokenizer template without system turns) are left out: training never saw such data."""
    from prospect.errors import UserError

    candidates = [(messages, []) for messages in PROBE_CONVERSATIONS]
    candidates += [(messages + [Message("assistant", "Sure.")], []) for messages in PROBE_CONVERSATIONS]
    if template.name != "auto" or getattr(template, "supports_tools", False):
        candidates.append((PROBE_TOOL_CONVERSATION, PROBE_TOOLS))
        candidates.append((PROBE_TOOL_CONVERSATION[:2], PROBE_TOOLS))
    probes = []
    for messages, tools in candidates:
        last_is_reply = messages[-1].role in ("assistant", "function_call")
        try:
            text = template.render(messages, tools, add_generation_prompt=not last_is_reply).text
        except UserError:
            continue
        probes.append((messages, tools, text))
    return probes


def renders_like(tokenizer, chat_template: str | None, template) -> bool:
    """Whether `chat_template` (Jinja) renders every probe conversation exactly as `template` does."""
    if not chat_template or not isinstance(chat_template, str):
        return False
    for messages, tools, expected in _probe_set(template):
        last_is_reply = messages[-1].role in ("assistant", "function_call")
        try:
            got = tokenizer.apply_chat_template(
                to_hf_messages(messages),
                tools=to_hf_tools(tools) or None,
                chat_template=chat_template,
                add_generation_prompt=not last_is_reply,
                tokenize=False,
            )
        except Exception:  # a template that cannot render a probe (e.g. raises on tools) does not match
            return False
        if got != expected:
            return False
    return True


def training_chat_template(tokenizer, template) -> str:
    """The Jinja chat template to save: the tokenizer's own when it already renders like `template`."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template.name != "auto" and renders_like(tokenizer, own, template):
        return own
    return chat_template_jinja(template)


# --------------------------------------------------------------------------------------------------
# The export


def export_model(config) -> Path:
    """Merge `adapter_name_or_path` into `model_name_or_path` and write a plain HF model to `export_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    from prospect.inference import load_inference_model, parse_adapters, read_run_config
    from prospect.model import model_folder

    if not config.export_dir:
        raise UserError("export_dir is not set: say where the merged model goes, e.g. `export_dir=saves/merged`.")
    target = Path(config.export_dir).expanduser()
    adapters = parse_adapters(config.adapter_name_or_path)
    _check_target(target, config, adapters)
    run = read_run_config(adapters[-1].path) if adapters else {}
    dtype_name = export_dtype_name(config, run)
    dtype = getattr(torch, dtype_name)

    print(f"Loading {config.model_name_or_path} in float32 ...", flush=True)
    if config.quantization_bit is not None:  # as QLoRA adapters are deployed
        print(f"QLoRA (quantization_bit: {config.quantization_bit}): the adapters are merged into the full-precision "
              "base, and the export is checked against base + adapters in float32.", flush=True)
    model, tokenizer, template = load_inference_model(config, device="cpu", dtype=torch.float32, quantize=False)
    prompts = _probe_prompts(template, tokenizer)
    if adapters:
        reference = _logits(model, prompts)
        print(f"Merging {len(adapters)} adapter(s) in order: {', '.join(a.path for a in adapters)}", flush=True)
        model = _merge_adapters(model, [a.key for a in adapters])
        _compare("merge (merged float32 vs base+adapters)", _logits(model, prompts), reference, MERGE_TOLERANCE)
    else:
        reference = _logits(model, prompts)

    model = model.to(dtype)
    _set_stop_tokens(model, tokenizer, template)
    tokenizer.chat_template = training_chat_template(tokenizer, template)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        shard_bytes = max(1, int(config.export_size * 1e9))  # GB as the hub counts them: 10^9 bytes
        print(f"Writing {dtype_name} weights to {target} (shards of at most {config.export_size:g} GB) ...", flush=True)
        model.save_pretrained(str(staging), max_shard_size=shard_bytes)
        tokenizer.save_pretrained(str(staging))
        _copy_extra_base_files(model_folder(config.model_name_or_path, cache_dir=config.cache_dir), staging)

        reloaded = AutoModelForCausalLM.from_pretrained(
            str(staging), dtype=torch.float32, trust_remote_code=config.trust_remote_code
        ).eval()
        _compare_weights(reloaded, model)
        del model
        gc.collect()
        exported = _logits(reloaded, prompts)
        del reloaded
        gc.collect()
        worst = _compare(f"end to end (reloaded {dtype_name} export vs base+adapters)", exported, reference,
                         END_TO_END_TOLERANCE[dtype_name])
        written = json.loads((staging / "config.json").read_text(encoding="utf-8")).get("dtype")
        if written != dtype_name:
            raise RuntimeError(f"export check failed: config.json says dtype {written}, expected {dtype_name}.")
        if not renders_like(tokenizer, _saved_chat_template(staging), template):
            raise RuntimeError(
                f"export check failed: the saved tokenizer's chat template does not render like the "
                f"{template.name!r} template used in training."
            )
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(
        f"Exported to {target} ({dtype_name}, template {template.name}); reloaded logits match base+adapters "
        f"within {worst:.2e} of the largest logit.",
        flush=True,
    )
    return target


def _probe_prompts(template, tokenizer) -> list[list[int]]:
    """Token ids of the probe prompts the logits checks run on (those the template can render)."""
    from prospect.inference import encode_prompt, render_prompt

    prompts = []
    for messages in PROBE_CONVERSATIONS:
        try:
            prompts.append(encode_prompt(tokenizer, render_prompt(template, messages)))
        except UserError:  # e.g. a tokenizer template that refuses system turns
            continue
    if not prompts:
        raise UserError(f"the {template.name!r} chat template cannot render even a one-message conversation.")
    return prompts


def export_dtype_name(config, run: dict) -> str:
    """`export_dtype`, with `auto` resolved as the module docstring says."""
    if config.export_dtype != "auto":
        return config.export_dtype
    trained_bf16 = run.get("bf16", config.bf16) if run else config.bf16
    trained_fp16 = run.get("fp16", config.fp16) if run else config.fp16
    if trained_bf16:
        return "bfloat16"
    if trained_fp16:
        return "float16"
    stored = _stored_dtype(config)
    return stored if stored in ("bfloat16", "float16") else "float32"


def _stored_dtype(config) -> str | None:
    """The dtype the base checkpoint's config.json records (None for GGUF files and hub ids)."""
    from prospect.model import _gguf_for

    if _gguf_for(config.model_name_or_path) is not None:
        return None  # dequantised GGUF weights: float32 is the only lossless choice
    path = Path(config.model_name_or_path) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    value = data.get("dtype") or data.get("torch_dtype")
    return value if isinstance(value, str) else None


def _check_target(target: Path, config, adapters) -> None:
    inputs = [Path(a.path) for a in adapters] + [Path(config.model_name_or_path).expanduser()]
    inputs = [p.resolve() for p in inputs if p.exists()]
    resolved = target.resolve()
    if any(resolved == p or resolved in p.parents for p in inputs):
        raise UserError(
            f"export_dir: {target} is (or holds) one of the inputs (the base model or an adapter); "
            "choose another folder."
        )
    if target.exists() and not target.is_dir():
        raise UserError(f"export_dir: {target} is a file; choose a folder.")
    if target.is_dir() and any(target.iterdir()) and not config.export_overwrite:
        raise UserError(
            f"export_dir: {target} is not empty; choose another folder or set `export_overwrite: true` "
            "to replace it."
        )


def _merge_adapters(model, keys: list[str]):
    """Fold the adapters' LoRA updates into the base weights, in order; returns the plain model."""
    return model.merge_and_unload(adapter_names=keys)


def _logits(model, prompts: list[list[int]]) -> list:
    """Float32 logits of every position of every prompt (one prompt at a time: no padding in the way)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(torch.tensor([p], device=device)).logits[0].float().cpu() for p in prompts]


def _compare(what: str, got: list, expected: list, tolerance: float) -> float:
    """Largest |got - expected| relative to max(1, largest |expected|); raise when over `tolerance`."""
    worst = 0.0
    for a, b in zip(got, expected):
        scale = max(1.0, float(b.abs().max()))
        worst = max(worst, float((a - b).abs().max()) / scale)
    if not worst <= tolerance:  # also catches NaN
        raise RuntimeError(
            f"export check failed — {what}: logits differ by {worst:.3g} of the largest logit "
            f"(allowed {tolerance:g}). The export was not written; please report this with your config."
        )
    return worst


def _saved_chat_template(folder: Path) -> str | None:
    """The chat template as written to disk (chat_template.jinja, or inside tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return None


def _compare_weights(reloaded, merged) -> None:
    """The reloaded export must hold exactly the merged weights (cast to the export dtype)."""
    import torch

    saved, expected = reloaded.state_dict(), merged.state_dict()
    missing = sorted(set(expected) - set(saved))
    changed = [key for key in expected if key in saved
               and not torch.equal(saved[key].cpu(), expected[key].cpu().to(saved[key].dtype))]
    if missing or changed:
        raise RuntimeError(
            f"export check failed — files: the reloaded export lacks {missing[:5]} and differs in {changed[:5]} "
            f"({len(missing)} missing, {len(changed)} different tensors). The export was not written; please "
            "report this with your config."
        )


def _set_stop_tokens(model, tokenizer, template) -> None:
    """Make plain `generate` on the export stop at the template's end-of-turn token too."""
    from prospect.inference import stop_token_ids

    ids = stop_token_ids(tokenizer, template, model)
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _copy_extra_base_files(base: str, staging: Path) -> None:
    """Carry over small descriptive files of the base folder (license, readme) that save_pretrained does not write."""
    folder = Path(base)
    if not folder.is_dir():
        return
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "README.md", "USE_POLICY.md"):
        source = folder / name
        if source.is_file() and not (staging / name).exists():
            shutil.copy2(source, staging / name)


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace `target` by `staging` (same parent folder, so the renames are atomic)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "previous")
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
