"""End-to-end training on a tiny random model with SmolLM2's real tokenizer and the bundled data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prospect.config import build_config
from prospect.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DATA = ROOT / "examples" / "data"
OUTPUT_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "run_config.yaml", "metrics.jsonl", "train_results.json", "training_loss.png")


def make_config(tmp_path: Path, model_dir: Path, **overrides):
    stage = overrides.get("stage", "kto")
    values = {
        "model_name_or_path": str(model_dir),
        "stage": stage,
        "dataset": "signoff_kto" if stage == "kto" else "signoff_sft",
        "dataset_dir": str(EXAMPLES_DATA),
        "template": "auto",
        "cutoff_len": 256,
        "max_samples": 24,
        "output_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 5e-3,
        "lr_scheduler_type": "constant",
        "max_steps": 5,
        "logging_steps": 1,
        "save_steps": 100,
        "plot_loss": True,
        "lora_rank": 4,
        "seed": 7,
    }
    values.update(overrides)
    return build_config(values, source="test")


def run(config):
    from prospect.train import train

    return train(config)


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def logged(folder, key: str) -> list:
    """One metric's values, line by line, from a run's metrics.jsonl (train and eval lines)."""
    return [json.loads(line)[key] for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), "both adapters must hold the same tensors"
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture
def spy_model(monkeypatch):
    """Captures the model train() builds, to inspect its weights afterwards."""
    import prospect.train

    built = []
    original = prospect.train.load_trainable_model

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(prospect.train, "load_trainable_model", spy)
    return built


def base_weights_unchanged(model, model_dir: Path) -> bool:
    from safetensors.torch import load_file

    original = load_file(str(model_dir / "model.safetensors"))
    trained = {name.replace("base_model.model.", "").replace(".base_layer", ""): p
               for name, p in model.named_parameters() if "lora_" not in name}
    return all(torch.equal(trained[name], tensor) for name, tensor in original.items() if name in trained)


@pytest.mark.parametrize("stage", ["kto", "sft"])
def test_five_step_lora_run(tmp_path, tiny_model_dir, spy_model, stage):
    config = make_config(tmp_path, tiny_model_dir, stage=stage, report_to="mlflow,tensorboard")
    results = run(config)
    out = Path(config.output_dir)

    for name in OUTPUT_FILES + (("training_rewards.png", "training_kl.png") if stage == "kto" else ()):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["split"] == "train"]
    assert [line["step"] for line in train_lines] == [1, 2, 3, 4, 5]
    expected = {"loss", "grad_norm", "learning_rate", "tokens_per_second"}
    if stage == "kto":
        expected |= {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"}
    for line in train_lines:
        assert expected <= line.keys(), expected - line.keys()
        assert all(torch.isfinite(torch.tensor(float(line[k]))) for k in expected)
    assert results["num_steps"] == 5 and results["num_tokens"] > 0 and results["peak_memory_bytes"] > 0
    if stage == "kto":
        # LoRA B starts at zero, so at step 1 the policy is the reference: r = 0, z0 = 0, loss = 1 − σ(0).
        first = train_lines[0]
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0, abs=1e-6)
        assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and train_lines[-1]["rewards/margins"] != 0
        assert results["reference_forward_passes"] == 2 * 3  # 24 examples / 8 per pass, targets + KL pairs

    model = spy_model[0]
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().max()) > 0 for p in lora_b), "LoRA B starts at zero and must have moved"
    assert base_weights_unchanged(model, tiny_model_dir)
    assert (out / "runs").is_dir() and (out / "mlruns").exists()


def test_saved_adapter_loads_with_plain_peft_and_matches_training_logits(tmp_path, tiny_model_dir, spy_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prospect.losses import token_logps
    from prospect.packing import pack
    from prospect.train import HiddenStates

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=3)
    run(config)
    trained = spy_model[0].eval()
    ids = [1, 520, 33, 9023, 17, 42, 2]
    batch = pack([(ids, ids)])
    with torch.no_grad():
        training_logps = token_logps(HiddenStates(trained)(**batch.model_inputs()),
                                     trained.get_base_model().get_output_embeddings(), batch.targets)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, config.output_dir).eval()
        logits = loaded(torch.tensor([ids])).logits[0].float()
    plain_logps = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(training_logps[:-1], plain_logps, atol=1e-5)


def test_reference_logps_are_computed_once_and_reused(tmp_path, tiny_model_dir, monkeypatch):
    import prospect.train

    calls = []
    original = prospect.train.compute_reference_logps
    monkeypatch.setattr(prospect.train, "compute_reference_logps",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    # 24 examples, batch 4: an epoch is 6 steps; 12 steps run two epochs on one reference pass.
    config = make_config(tmp_path, tiny_model_dir, max_steps=-1, num_train_epochs=2, save_steps=6)
    first = run(config)
    assert first["num_steps"] == 12 and first["epochs"] == 2
    assert len(calls) == 1 and first["reference_forward_passes"] == 6

    # A resumed run reads them from the run folder: no reference forward pass at all.
    resumed = run(make_config(tmp_path, tiny_model_dir, max_steps=-1, num_train_epochs=2, save_steps=6,
                              resume_from_checkpoint="true"))
    assert resumed["resumed_from_step"] == 12 and resumed["reference_forward_passes"] == 0 and len(calls) == 1


@pytest.mark.parametrize("stage", ["kto", "sft"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, stage):
    import prospect.train

    overrides = dict(stage=stage, max_steps=6, save_steps=2, lora_dropout=0.1, per_device_train_batch_size=3)
    uninterrupted = make_config(tmp_path / "a", tiny_model_dir, **overrides)
    run(uninterrupted)

    step_function = "_kto_step" if stage == "kto" else "_sft_step"
    original, calls = getattr(prospect.train, step_function), []

    def crash_in_step_five(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(prospect.train, step_function, crash_in_step_five)
    interrupted = make_config(tmp_path / "b", tiny_model_dir, **overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(interrupted)
    assert sorted(p.name for p in Path(interrupted.output_dir).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(prospect.train, step_function, original)
    resumed = run(make_config(tmp_path / "b", tiny_model_dir, **overrides, resume_from_checkpoint="true"))

    assert resumed["resumed_from_step"] == 4
    assert max_difference(adapter_weights(uninterrupted.output_dir), adapter_weights(interrupted.output_dir)) <= 1e-6
    lines = [json.loads(line) for line in (Path(interrupted.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_sft_gradient_accumulation_is_invariant(tmp_path, tiny_model_dir):
    # A small learning rate: Adam divides by |g|, so float noise in near-zero gradient entries
    # (summation order differs between the two runs) moves weights by up to ~10% of the rate.
    common = dict(stage="sft", max_steps=2, max_grad_norm=0.0, lr_scheduler_type="constant", learning_rate=1e-4)
    one_big = make_config(tmp_path / "8x1", tiny_model_dir, per_device_train_batch_size=8,
                          gradient_accumulation_steps=1, **common)
    eight_small = make_config(tmp_path / "1x8", tiny_model_dir, per_device_train_batch_size=1,
                              gradient_accumulation_steps=8, **common)
    a, b = run(one_big), run(eight_small)
    assert a["num_trained_tokens"] == b["num_trained_tokens"]
    difference = max_difference(adapter_weights(one_big.output_dir), adapter_weights(eight_small.output_dir))
    assert difference <= 1e-5
    # ... and the runs did move the adapter (a difference of 0 between two untrained adapters proves nothing).
    assert max(float(w.abs().max()) for name, w in adapter_weights(one_big.output_dir).items() if "lora_B" in name) > 1e-4


def test_kto_accumulation_is_invariant_and_works_at_micro_batch_one(tmp_path, tiny_model_dir):
    common = dict(max_steps=2, max_grad_norm=0.0, learning_rate=1e-4)  # small: see the SFT test
    a = make_config(tmp_path / "4x1", tiny_model_dir, per_device_train_batch_size=4, **common)
    b = make_config(tmp_path / "1x4", tiny_model_dir, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                    **common)
    run(a), run(b)
    assert max_difference(adapter_weights(a.output_dir), adapter_weights(b.output_dir)) <= 1e-5
    assert all(value >= 0 for value in logged(b.output_dir, "kl"))


def test_full_fine_tuning_kto_changes_the_base_weights(tmp_path, tiny_model_dir, spy_model):
    config = make_config(tmp_path, tiny_model_dir, finetuning_type="full", max_steps=2, learning_rate=1e-3)
    results = run(config)
    out = Path(config.output_dir)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not base_weights_unchanged(spy_model[0], tiny_model_dir)
    assert results["reference_forward_passes"] == 6


def test_kto_eval_reports_rewards_and_sign_accuracy(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, val_size=8, max_samples=32, max_steps=2, eval_steps=2)
    run(config)
    lines = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if line["split"] == "eval"]
    assert [line["step"] for line in evals] == [2]
    assert 0 <= evals[0]["rewards/accuracy"] <= 1 and "rewards/margins" in evals[0] and evals[0]["loss"] > 0


def test_existing_output_dir_needs_overwrite_or_resume(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=1)
    run(config)
    keep = Path(config.output_dir) / "my_notes.txt"
    keep.write_text("mine")
    with pytest.raises(UserError, match="is not empty.*overwrite_output_dir: true"):
        run(config)
    run(make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=1, overwrite_output_dir=True))
    assert keep.read_text() == "mine", "files the user put in output_dir survive overwrite_output_dir"


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    from prospect.checkpoints import resolve_resume

    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / ".checkpoint-8.tmp").mkdir()  # a crash during the save of step 8
    (out / ".checkpoint-8.tmp" / "adapter_model.safetensors").write_text("partial")
    (out / "checkpoint-6").mkdir()  # a folder without its state file is not a checkpoint either
    assert resolve_resume("true", str(out)) == out / "checkpoint-4"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(str(out / "checkpoint-6"), str(out))


def test_training_continues_from_an_existing_adapter(tmp_path, tiny_model_dir):
    first = make_config(tmp_path / "first", tiny_model_dir, stage="sft", max_steps=3)
    run(first)
    # A learning rate of ~0 leaves the adapter where it started: exactly the first run's adapter.
    second = make_config(tmp_path / "second", tiny_model_dir, stage="sft", max_steps=1, learning_rate=1e-30,
                         adapter_name_or_path=first.output_dir)
    run(second)
    assert max_difference(adapter_weights(first.output_dir), adapter_weights(second.output_dir)) <= 1e-6
    with pytest.raises(UserError, match="has no adapter_config.json"):
        run(make_config(tmp_path / "third", tiny_model_dir, stage="sft", adapter_name_or_path=str(tmp_path)))


@pytest.mark.parametrize("stage", ["sft", "kto"])  # KTO: the recompute must ignore the KL pass's prompt cache
def test_gradient_checkpointing_gives_the_same_update(tmp_path, tiny_model_dir, spy_model, stage):
    plain = make_config(tmp_path / "plain", tiny_model_dir, stage=stage, max_steps=3)
    checkpointed = make_config(tmp_path / "ckpt", tiny_model_dir, stage=stage, max_steps=3,
                               gradient_checkpointing=True)
    run(plain), run(checkpointed)
    assert [m.get_base_model().is_activation_checkpointing for m in spy_model] == [False, True]
    assert max_difference(adapter_weights(plain.output_dir), adapter_weights(checkpointed.output_dir)) <= 1e-6


# KTO: the KL pass and the reference pass (LoRA off) run the same layers eagerly. With gradient checkpointing
# compiling cannot take effect, and the run says so.
@pytest.mark.parametrize("stage, gradient_checkpointing", [("sft", False), ("kto", False), ("kto", True)])
def test_torch_compile_gives_the_same_update(tmp_path, tiny_model_dir, capsys, stage, gradient_checkpointing):
    from torch._dynamo.utils import counters

    plain = make_config(tmp_path / "plain", tiny_model_dir, stage=stage, max_steps=3,
                        gradient_checkpointing=gradient_checkpointing)
    compiled = make_config(tmp_path / "compiled", tiny_model_dir, stage=stage, max_steps=3, torch_compile=True,
                           gradient_checkpointing=gradient_checkpointing)
    counters.clear()
    run(plain)
    assert counters["stats"]["unique_graphs"] == 0, "nothing is compiled without torch_compile"
    run(compiled)
    warned = "torch_compile is not applied with gradient_checkpointing" in capsys.readouterr().out
    assert warned == gradient_checkpointing
    assert (counters["stats"]["unique_graphs"] > 0) != gradient_checkpointing, "compiled: the decoder layers"
    assert max_difference(adapter_weights(plain.output_dir), adapter_weights(compiled.output_dir)) <= 1e-5
    assert logged(compiled.output_dir, "loss") == pytest.approx(logged(plain.output_dir, "loss"), abs=1e-5)


def test_bf16_run_and_pref_ftx(tmp_path, tiny_model_dir):
    bf16 = make_config(tmp_path / "bf16", tiny_model_dir, bf16=True, max_steps=2)
    results = run(bf16)
    assert results["num_steps"] == 2
    assert all(0 < loss < 1 for loss in logged(bf16.output_dir, "loss"))
    # pref_ftx adds an SFT term on desirable completions: the first step's loss grows by it.
    ftx = make_config(tmp_path / "ftx", tiny_model_dir, pref_ftx=1.0, max_steps=1)
    run(ftx)
    loss = logged(ftx.output_dir, "loss")[0]
    assert loss > 0.5 + 1.0  # 0.5 from KTO at step 1, plus a token NLL of a random model (> ln 49152 / 10)


def test_learning_rate_schedule_with_warmup(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=4, warmup_steps=2,
                         lr_scheduler_type="linear", learning_rate=1e-3)
    run(config)
    rates = logged(config.output_dir, "learning_rate")
    # logged after each step's scheduler update: warm-up to the peak at step 2, then linear decay to 0
    assert rates == pytest.approx([5e-4, 1e-3, 5e-4, 0.0])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "kto"])
def test_torchrun_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_model_dir, stage):
    import os
    import subprocess
    import sys

    common = dict(stage=stage, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-4, save_steps=3)
    if stage == "kto":  # 9 examples in steps of 4: the last step's one example leaves rank 1 a stand-in only;
        # 9 held-out examples in eval batches of 4: rank 0 runs 2 eval batches, rank 1 one
        common.update(max_samples=18, val_size=9, eval_steps=3, per_device_eval_batch_size=4, max_steps=-1,
                      num_train_epochs=1, learning_rate=1e-3)
    single = make_config(tmp_path / "single", tiny_model_dir, gradient_accumulation_steps=2, **common)
    run(single)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(make_config(tmp_path / "ddp", tiny_model_dir, **common).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={29533 if stage == 'sft' else 29534}",
         "-m", "prospect", "train", str(config_file)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "× 1 accumulation × 2 processes" in result.stdout
    ddp_out = Path(tmp_path / "ddp" / "out")
    assert max_difference(adapter_weights(single.output_dir), adapter_weights(ddp_out)) <= 1e-5
    assert logged(ddp_out, "loss") == pytest.approx(logged(single.output_dir, "loss"), abs=1e-5)
    assert len(logged(ddp_out, "loss")) == (3 if stage == "sft" else 4)  # KTO: 3 steps and an evaluation


@pytest.mark.parametrize("cutoff_len", [256, 40])  # 40: some KL pairs are cut at cutoff_len
def test_kl_pass_on_cached_prompts_equals_whole_kl_pairs(tmp_path, tiny_model_dir, cutoff_len):
    """The KL pass continues the prompts cached by the target forward (PromptCache): its log-probs must
    be those of running the whole KL pairs, with a trained LoRA (not the zero-B start) and grouped-query
    attention, both with grad (the training step) and without (the reference pass)."""
    from prospect.data.pipeline import prepare_data
    from prospect.model import load_tokenizer, load_trainable_model
    from prospect.packing import packed_attention_implementation
    from prospect.train import Examples, HiddenStates, sequence_logps

    config = make_config(tmp_path, tiny_model_dir, cutoff_len=cutoff_len)
    examples = Examples(prepare_data(config, load_tokenizer(config.model_name_or_path)).train, stage="kto",
                        cutoff_len=cutoff_len, seed=3)
    attention, _ = packed_attention_implementation("auto", torch.device("cpu"))
    model = load_trainable_model(config, device=torch.device("cpu"), attn_implementation=attention)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    hidden_model = HiddenStates(model)
    head = hidden_model.causal_lm().get_output_embeddings()
    prompt_lens = examples.dataset["prompt_len"]  # first the examples whose prompt is longer than their partner's
    indices = sorted(range(len(examples)), key=lambda i: prompt_lens[examples.partners[i]] - prompt_lens[i])[:5]
    expected_kl = sequence_logps(hidden_model, head, examples.kl_pairs(indices), "cpu")[0]
    expected_targets = sequence_logps(hidden_model, head, examples.targets(indices), "cpu")[0]
    if cutoff_len == 40:
        partners = [examples.dataset[examples.partners[i]] for i in indices]
        pair_lens = [examples.dataset[i]["prompt_len"] + len(partner["input_ids"]) - partner["prompt_len"]
                     for i, partner in zip(indices, partners)]
        assert max(pair_lens) > cutoff_len, "the case must include a KL pair cut at cutoff_len"
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            cache = examples.prompt_cache(indices, hidden_model)
            assert cache is not None
            targets = sequence_logps(hidden_model, head, examples.targets(indices), "cpu", cache)[0]
            cache.mode = "extend"
            kl = sequence_logps(hidden_model, head, examples.kl_continuations(indices), "cpu", cache)[0]
        assert torch.allclose(targets, expected_targets, atol=1e-5, rtol=0)
        assert torch.allclose(kl, expected_kl, atol=1e-4, rtol=1e-6), (kl, expected_kl)
        assert float((kl - expected_kl).abs().max()) < 1e-3 * float(expected_kl.abs().max())
