"""QLoRA (`quantization_bit`) on CPU, where bitsandbytes 0.50 runs its 4-bit layers, and the GPU-only
keys: on this machine each exits 2 with the reason; on a faked CUDA device each reaches the code that
applies it (the real GPU runs are benchmarks/gpu_check.py's)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from prospect.cli import main
from prospect.errors import UserError
from test_train import (  # noqa: F401 (spy_model: a fixture)
    adapter_weights, logged, make_config, max_difference, run, run_crashing_in_step, spy_model)

pytest.importorskip("bitsandbytes")


def linear_classes(model) -> set[str]:
    return {type(module).__name__ for name, module in model.named_modules() if name.endswith("q_proj.base_layer")}


@pytest.mark.parametrize("stage", ["sft", "kto"])
def test_qlora_trains_lora_on_a_4bit_base(tmp_path, tiny_model_dir, spy_model, stage):
    qlora = make_config(tmp_path / "qlora", tiny_model_dir, stage=stage, quantization_bit=4, max_steps=4)
    lora = make_config(tmp_path / "lora", tiny_model_dir, stage=stage, max_steps=4)
    run(qlora)
    run(lora)
    assert linear_classes(spy_model[0]) == {"Linear4bit"} and linear_classes(spy_model[1]) == {"Linear"}
    losses = logged(qlora.output_dir, "loss")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    # The same adapter tensors, trained to nearby but not equal values: the base differs by its rounding.
    difference = max_difference(adapter_weights(qlora.output_dir), adapter_weights(lora.output_dir))
    assert 0 < difference < 0.05, difference
    saved = json.loads((Path(qlora.output_dir) / "adapter_config.json").read_text())
    assert saved["r"] == 4 and any("q_proj" in name for name in saved["target_modules"])


def test_qlora_8bit_trains_lora_on_an_int8_base(tmp_path, tiny_model_dir, spy_model):
    config = make_config(tmp_path, tiny_model_dir, stage="kto", quantization_bit=8, max_steps=3)
    run(config)
    assert linear_classes(spy_model[0]) == {"Linear8bitLt"}
    losses = logged(config.output_dir, "loss")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1:] != losses[:-1], losses
    assert adapter_weights(config.output_dir)


def sequence_logps(model, encoded) -> float:
    """Σ log p(completion token) of one KTO example, by plain transformers (no prospect code)."""
    ids = torch.tensor([encoded["input_ids"]])
    with torch.no_grad():
        logps = model(ids).logits.float().log_softmax(-1)[0]
    targets = ids[0, encoded["prompt_len"]:]
    return float(logps[encoded["prompt_len"] - 1 : -1].gather(1, targets[:, None]).sum())


def test_qlora_reference_is_the_quantized_base_with_adapters_off(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from prospect.data.pipeline import prepare_data

    config = make_config(tmp_path, tiny_model_dir, stage="kto", quantization_bit=4, max_steps=3)
    run(config)
    stored = load_file(str(Path(config.output_dir) / "reference_logps.safetensors"))["train_logps"]
    data = prepare_data(config, AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    quantized = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    for module in quantized.modules():  # the kernel training uses (bitsandbytes' repacked one rounds otherwise)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    full = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    computed = [i for i in range(len(stored)) if not torch.isnan(stored[i])]
    assert len(computed) >= 8
    for i in computed:
        expected = sequence_logps(quantized, data.train[i])
        assert float(stored[i]) == pytest.approx(expected, abs=1e-4), i
    # ... which the full-precision base would not have given.
    assert max(abs(float(stored[i]) - sequence_logps(full, data.train[i])) for i in computed) > 1e-2


def test_qlora_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    from prospect.objectives.kto import KTO

    overrides = dict(stage="kto", quantization_bit=4, max_steps=4, save_steps=2)
    uninterrupted = make_config(tmp_path / "a", tiny_model_dir, **overrides)
    run(uninterrupted)
    interrupted = make_config(tmp_path / "b", tiny_model_dir, **overrides)
    run_crashing_in_step(interrupted, KTO, 3, monkeypatch)
    resumed = run(make_config(tmp_path / "b", tiny_model_dir, **overrides, resume_from_checkpoint="true"))
    assert resumed["resumed_from_step"] == 2
    assert max_difference(adapter_weights(uninterrupted.output_dir), adapter_weights(interrupted.output_dir)) <= 1e-6


def test_a_qlora_adapter_loads_on_the_full_precision_base_and_exports_merged_into_it(tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, tiny_model_dir, stage="sft", quantization_bit=4, max_steps=3)
    run(config)
    prompt = torch.tensor([[1, 17, 230, 4000, 52, 9]])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(prompt).logits
        with_adapter = PeftModel.from_pretrained(base, config.output_dir).eval()
        expected = with_adapter(prompt).logits
    assert float((expected - base_logits).abs().max()) > 1e-4, "the adapter must change the model"

    config_file = tmp_path / "export.yaml"
    config_file.write_text(config.to_yaml())
    code = main(["export", str(config_file), f"adapter_name_or_path={config.output_dir}",
                 f"export_dir={tmp_path / 'merged'}", "export_dtype=float32"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "merged into the full-precision base" in out.replace("\n", " ")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        assert float((merged(prompt).logits - expected).abs().max()) < 1e-4


def test_qlora_eval_and_chat_load_the_base_in_4_bits(tmp_path, tiny_model_dir, monkeypatch):
    from prospect.inference import load_inference_model

    config = make_config(tmp_path, tiny_model_dir, stage="sft", quantization_bit=4, max_steps=1)
    run(config)
    for merge in (False, True):  # chat asks for a merge: kept as adapters over a quantized base
        model, _, _ = load_inference_model(make_config(tmp_path, tiny_model_dir, stage="sft", quantization_bit=4,
                                                       adapter_name_or_path=config.output_dir), merge=merge)
        assert linear_classes(model) == {"Linear4bit"}


def test_quantization_without_bitsandbytes_exits_2_naming_the_extra(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    config_file = tmp_path / "run.yaml"
    config_file.write_text(make_config(tmp_path, tiny_model_dir, stage="sft").to_yaml())
    for command in ("train", "chat"):
        code = main([command, str(config_file), "quantization_bit=4"])
        err = capsys.readouterr().err
        assert code == 2 and "quantization_bit: 4 needs bitsandbytes" in err and "prospect[qlora]" in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("override, message", [
    ("quantization_type=fp4", "quantization_type and double_quantization apply to quantization_bit: 4"),
    ("quantization_bit=8 double_quantization=false", "apply to quantization_bit: 4"),
    ("quantization_bit=4 finetuning_type=full", "quantization_bit needs finetuning_type: lora"),
    ("enable_liger_kernel=true", "enable_liger_kernel: true: liger-kernel's kernels are Triton kernels for CUDA GPUs"),
    ("flash_attn=fa2", "flash_attn: fa2: this run has no CUDA device"),
])
def test_keys_this_machine_cannot_honour_exit_2_with_the_reason(tmp_path, tiny_model_dir, capsys, override, message):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine honours the GPU keys")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(make_config(tmp_path, tiny_model_dir, stage="kto").to_yaml())
    code = main(["train", str(config_file), *override.split()])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists(), "refused before anything is written"


# --------------------------------------------------------------------------------------------------
# A faked CUDA device: each GPU key reaches the code that applies it


def test_fa2_is_flash_attn_or_torchs_varlen_kernel_on_cuda(monkeypatch):
    import importlib.util

    from prospect.packing import PACKED_ATTENTION, VARLEN_ATTENTION, packed_attention_implementation

    cuda, real_find_spec = torch.device("cuda"), importlib.util.find_spec

    def installed(*names):
        kernels = {"flash_attn", "torch.nn.attention.varlen"}
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if name in names else None)
                            if name in kernels else real_find_spec(name, *a))

    installed()  # neither kernel
    assert packed_attention_implementation("auto", cuda) == PACKED_ATTENTION
    with pytest.raises(UserError, match="flash_attn: fa2: neither the flash-attn package .* nor a PyTorch"):
        packed_attention_implementation("fa2", cuda)
    installed("torch.nn.attention.varlen")  # PyTorch's own variable-length kernel: fa2 asks for it, auto not yet
    assert packed_attention_implementation("fa2", cuda) == VARLEN_ATTENTION
    assert packed_attention_implementation("auto", cuda) == PACKED_ATTENTION
    with pytest.raises(UserError, match="flash_attn: fa2: it computes in 16 bits: set bf16: true"):
        packed_attention_implementation("fa2", cuda, sixteen_bit=False)
    assert packed_attention_implementation("auto", cuda, sixteen_bit=False) == PACKED_ATTENTION
    installed("flash_attn", "torch.nn.attention.varlen")  # the package first
    assert packed_attention_implementation("fa2", cuda) == packed_attention_implementation("auto", cuda) == "flash_attention_2"
    assert packed_attention_implementation("sdpa", cuda) == PACKED_ATTENTION


def fake_liger(monkeypatch, model_types=("llama", "qwen2")) -> list[dict]:
    """A stand-in liger_kernel package that records what it is asked to patch."""
    calls: list[dict] = []
    package, transformers_module, monkey_patch = (types.ModuleType(n) for n in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"))
    transformers_module._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {name: None for name in model_types}
    for module in (package, transformers_module, monkey_patch):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return calls


def test_liger_is_applied_to_the_base_model_before_the_adapters(tmp_path, tiny_model_dir, monkeypatch):
    from prospect.model import check_gpu_keys, load_trainable_model

    calls = fake_liger(monkeypatch)
    config = make_config(tmp_path, tiny_model_dir, stage="kto", enable_liger_kernel=True)
    check_gpu_keys(config, torch.device("cuda"))  # installed and on CUDA: accepted
    model = load_trainable_model(config, device=torch.device("cpu"), attn_implementation="sdpa")
    assert len(calls) == 1
    call = calls[0]
    assert type(call.pop("model")).__name__ == "LlamaForCausalLM"  # the transformers model, not PEFT's wrapper
    assert call == dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    mlp = model.get_base_model().model.layers[0].mlp
    assert "forward" not in vars(mlp), "liger's SwiGLU replaces the MLP: prospect's lean MLP is not installed"


def test_liger_refuses_what_it_cannot_patch(tmp_path, tiny_model_dir, monkeypatch):
    from prospect.model import apply_liger_kernel, check_gpu_keys, load_model

    config = make_config(tmp_path, tiny_model_dir, stage="kto", enable_liger_kernel=True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)
    with pytest.raises(UserError, match="enable_liger_kernel: true needs liger-kernel.*pip install liger-kernel"):
        check_gpu_keys(config, torch.device("cuda"))
    fake_liger(monkeypatch, model_types=("qwen2",))
    with pytest.raises(UserError, match="liger-kernel has no kernels for llama models"):
        apply_liger_kernel(load_model(str(tiny_model_dir)))


def test_quantization_reaches_from_pretrained_with_the_configured_settings(tmp_path, tiny_model_dir, monkeypatch):
    import prospect.model

    seen = {}
    original = prospect.model._from_pretrained

    def spy(loader, name_or_path, what, **kwargs):
        seen.update(kwargs)
        return original(loader, name_or_path, what, **kwargs)

    monkeypatch.setattr(prospect.model, "_from_pretrained", spy)
    config = make_config(tmp_path, tiny_model_dir, stage="kto", quantization_bit=4, quantization_type="fp4",
                         double_quantization=False)
    model = prospect.model.load_trainable_model(config, device=torch.device("cpu"), attn_implementation="sdpa")
    quantization = seen["quantization_config"]
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "fp4"
    assert not quantization.bnb_4bit_use_double_quant and quantization.bnb_4bit_compute_dtype == torch.float32
    assert seen["device_map"] == {"": torch.device("cpu")}
    weight = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert weight.quant_state.quant_type == "fp4" and weight.quant_state.nested is False


def test_the_varlen_path_lays_out_packed_sequences_as_pytorchs_kernel_expects(monkeypatch):
    """`prospect_varlen` on CPU, with PyTorch's CUDA-only kernel replaced by a plain implementation of its
    documented contract ([T, heads, d] in and out, cumulative bounds, window (-1, 0) = causal): the
    result equals SDPA run per sequence."""
    import types as pytypes

    import torch.nn.attention.varlen as varlen_module

    import prospect.packing as packing

    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), **_):
        calls.append(window_size)
        assert q.dim() == 3 and q.shape[1] == k.shape[1], "[T, heads, d], key/value heads repeated to the query's"
        assert cu_q.dtype == torch.int32 and max_q == int((cu_q[1:] - cu_q[:-1]).max())
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            scores = (q[start:end].float().transpose(0, 1) @ k[start:end].float().permute(1, 2, 0)) * scale
            if window_size == (-1, 0):
                scores = scores.masked_fill(torch.ones(end - start, end - start).triu(1).bool(), float("-inf"))
            out[start:end] = (scores.softmax(-1) @ v[start:end].float().transpose(0, 1)).transpose(0, 1).to(q.dtype)
        return out

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn)
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    query = torch.randn(1, 8, 18, 16, generator=generator).bfloat16()
    key, value = (torch.randn(1, 2, 18, 16, generator=generator).bfloat16() for _ in range(2))  # GQA 8 / 2
    module = pytypes.SimpleNamespace(layer_idx=0)
    kwargs = dict(cu_seq_lens_q=cu, max_length_q=max(lengths))
    got, _ = packing.packed_varlen_attention(module, query, key, value, None, scaling=0.25, **kwargs)
    expected, _ = packing.packed_sdpa_attention(module, query, key, value, None, scaling=0.25, **kwargs)
    assert calls == [(-1, 0)] and got.shape == expected.shape == (1, 18, 8, 16)
    assert float((got.float() - expected.float()).abs().max()) < 2e-2
    # In float32 (or with dropout) the kernel does not apply: SDPA per sequence, exactly.
    same, _ = packing.packed_varlen_attention(module, query.float(), key.float(), value.float(), None, scaling=0.25,
                                              **kwargs)
    assert calls == [(-1, 0)] and torch.equal(same, packing.packed_sdpa_attention(
        module, query.float(), key.float(), value.float(), None, scaling=0.25, **kwargs)[0])
