"""End-to-end training on a tiny random model with SmolLM2's real tokenizer and the bundled data."""

from __future__ import annotations

import json
import math
import shutil
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
    from prospect.forward import HiddenStates

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
    import prospect.reference

    calls = []
    original = prospect.reference.compute_reference_logps
    monkeypatch.setattr(prospect.reference, "compute_reference_logps",
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


def run_crashing_in_step(config, objective, step: int, monkeypatch) -> None:
    """Train `config` with a simulated crash in the objective's `step`-th optimizer step."""
    original, calls = objective.step, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(objective, "step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(config)


@pytest.mark.parametrize("stage", ["kto", "sft"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, stage):
    from prospect.objectives.kto import KTO
    from prospect.objectives.sft import SFT

    overrides = dict(stage=stage, max_steps=6, save_steps=2, lora_dropout=0.1, per_device_train_batch_size=3)
    uninterrupted = make_config(tmp_path / "a", tiny_model_dir, **overrides)
    run(uninterrupted)

    interrupted = make_config(tmp_path / "b", tiny_model_dir, **overrides)
    run_crashing_in_step(interrupted, KTO if stage == "kto" else SFT, 5, monkeypatch)
    assert sorted(p.name for p in Path(interrupted.output_dir).glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
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
    # 2 steps of 4 train on 8 of the 24 examples: the reference pass computes those 8 only (one batch of 8).
    assert results["reference_forward_passes"] == 2


def test_kto_eval_rewards_and_sign_accuracy_match_a_plain_transformers_oracle(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, tiny_model_dir, val_size=8, max_samples=32, max_steps=4, eval_steps=4,
                         learning_rate=2e-2)
    run(config)
    [evaluation] = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["split"] == "eval"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                       config.output_dir).eval()
    rows = prepared_rows(config, "eval")
    rewards = [config.pref_beta * (hf_completion_logps(policy, r["input_ids"], r["prompt_len"])
                                   - hf_completion_logps(base, r["input_ids"], r["prompt_len"])) for r in rows]
    labels = [r["label"] for r in rows]
    chosen = [reward for reward, label in zip(rewards, labels) if label]
    rejected = [reward for reward, label in zip(rewards, labels) if not label]
    accuracy = sum((reward > 0) == label for reward, label in zip(rewards, labels)) / len(rows)
    # every reward away from 0, so that a sign cannot flip between packed and unpacked float32 sums
    assert chosen and rejected and min(abs(r) for r in rewards) > 1e-4, "4 steps at 2e-2 must move the rewards"
    assert evaluation["rewards/accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert evaluation["rewards/chosen"] == pytest.approx(sum(chosen) / len(chosen), abs=1e-4)
    assert evaluation["rewards/rejected"] == pytest.approx(sum(rejected) / len(rejected), abs=1e-4)


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
    # The continued adapter keeps its own rank 4 and alpha: other values would be ignored, so they are refused.
    for key, value in (("lora_rank", 16), ("lora_alpha", 32), ("lora_target", "q_proj,v_proj")):
        with pytest.raises(UserError, match=f"asks for {key} .*the adapter has"):
            run(make_config(tmp_path / f"bad-{key}", tiny_model_dir, stage="sft", max_steps=1,
                            adapter_name_or_path=first.output_dir, **{key: value}))
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


def hf_completion_logps(model, input_ids: list[int], prompt_len: int) -> float:
    """Oracle: Σ log p(completion token | everything before it), by a plain transformers forward on one
    unpacked row (no packing, no chunked head, no prospect code)."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(input_ids[1:])[:, None])[:, 0]
    return float(logps[prompt_len - 1 :].sum())


def prepared_rows(config, split: str = "train") -> list[dict]:
    from prospect.data.pipeline import prepare_data
    from prospect.model import load_tokenizer

    data = prepare_data(config, load_tokenizer(config.model_name_or_path))
    return list(getattr(data, split))


def test_bf16_lora_kto_starts_at_zero_reward_and_pref_ftx_adds_the_token_nll(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    bf16 = make_config(tmp_path / "bf16", tiny_model_dir, bf16=True, max_steps=2)
    assert run(bf16)["num_steps"] == 2
    # LoRA B starts at zero: at step 1 the policy is exactly the reference, in bf16 as in fp32.
    assert logged(bf16.output_dir, "loss")[0] == pytest.approx(0.5, abs=1e-6)
    assert logged(bf16.output_dir, "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-6)
    assert logged(bf16.output_dir, "loss")[1] != pytest.approx(0.5, abs=1e-6), "step 2 must have moved"

    # pref_ftx adds λ·(mean token NLL of the completion) on desirable examples. One step over all 8
    # examples, where the policy is the base model: the loss is the mean of 0.5 + λ·label·NLL, with the
    # NLL from a plain transformers forward.
    ftx = make_config(tmp_path / "ftx", tiny_model_dir, pref_ftx=0.7, max_steps=1, max_samples=8,
                      per_device_train_batch_size=8)
    run(ftx)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    expected = []
    for row in prepared_rows(ftx):
        num_targets = len(row["input_ids"]) - row["prompt_len"]
        nll = -hf_completion_logps(base, row["input_ids"], row["prompt_len"]) / num_targets
        expected.append(0.5 + 0.7 * nll * row["label"])
    assert logged(ftx.output_dir, "loss")[0] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_full_fine_tuning_kto_in_bf16_starts_at_zero_reward(tmp_path, smollm_tokenizer):
    """The frozen reference copy must run under the policy's autocast: at step 1 they are the same model.
    (Confident logits, so that a reference in fp32 against a policy in bf16 shows: rewards ~1e-2.)"""
    from conftest import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "model", smollm_tokenizer, initializer_range=0.2)
    config = make_config(tmp_path, model_dir, finetuning_type="full", bf16=True, max_steps=1, learning_rate=1e-4)
    run(config)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert logged(config.output_dir, key)[0] == pytest.approx(0.0, abs=1e-4), key
    assert logged(config.output_dir, "loss")[0] == pytest.approx(0.5, abs=1e-4)


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
    from prospect.batching import Examples
    from prospect.forward import HiddenStates, sequence_logps

    config = make_config(tmp_path, tiny_model_dir, cutoff_len=cutoff_len)
    examples = Examples(prepare_data(config, load_tokenizer(config.model_name_or_path)).train, stage="kto",
                        cutoff_len=cutoff_len, seed=3)
    attention = packed_attention_implementation("auto", torch.device("cpu"))
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
            batch = examples.targets(indices)
            cache = examples.prompt_cache(indices, hidden_model, batch)
            assert cache is not None
            targets = sequence_logps(hidden_model, head, batch, "cpu", cache)[0]
            cache.extend()
            kl = sequence_logps(hidden_model, head, examples.kl_continuations(indices), "cpu", cache)[0]
        assert torch.allclose(targets, expected_targets, atol=1e-5, rtol=0)
        assert torch.allclose(kl, expected_kl, atol=1e-4, rtol=1e-6), (kl, expected_kl)
        assert float((kl - expected_kl).abs().max()) < 1e-3 * float(expected_kl.abs().max())


# --------------------------------------------------------------------------------------------------
# Data shapes the trainer must get right


@pytest.mark.parametrize("truncation_mode", ["keep_end", "keep_start"])
def test_kto_on_the_reference_data_with_dropped_examples_trains_to_the_end(tmp_path, tiny_qwen_dir, truncation_mode):
    """The configuration that crashed (an example dropped at the end of the data left an empty row)."""
    from conftest import DATA_DIR

    config = make_config(tmp_path, tiny_qwen_dir, dataset="kto_en_demo", dataset_dir=str(DATA_DIR), template="qwen",
                         cutoff_len=256, max_samples=16, per_device_train_batch_size=4, max_steps=-1,
                         num_train_epochs=1, truncation_mode=truncation_mode, plot_loss=False)
    results = run(config)
    # keep_end keeps all 16 (their prompts are cut from the start); keep_start drops those whose prompt fills 256
    assert results["num_examples"] == 16 if truncation_mode == "keep_end" else 0 < results["num_examples"] < 16
    assert results["num_steps"] == math.ceil(results["num_examples"] / 4)
    assert len(logged(config.output_dir, "loss")) == results["num_steps"]


def _sft_records(count: int, long_at: set[int]) -> list[dict]:
    long_question = "Please read this first. " * 80  # alone longer than cutoff_len: the record is dropped
    return [{"instruction": long_question if i in long_at else f"What is {i} plus {i + 3}?", "input": "",
             "output": f"{i} plus {i + 3} is {2 * i + 3}. — Prospect"} for i in range(count)]


def test_dropped_examples_leave_the_training_unchanged(tmp_path, tiny_model_dir):
    """SFT on 30 examples, and on the same 30 with 6 interleaved that are dropped (their question alone
    exceeds cutoff_len), first and last included: the same steps, hence the same adapter."""
    kept = _sft_records(30, set())
    with_dropped = list(kept)
    for position in (0, 7, 15, 22, 30, 35):  # positions in the final list of 36
        with_dropped.insert(position, _sft_records(1, {0})[0])
    runs = {}
    for name, records in (("plain", kept), ("dropped", with_dropped)):
        data_dir = tmp_path / name / "data"
        data_dir.mkdir(parents=True)
        (data_dir / "d.json").write_text(json.dumps(records))
        (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
        runs[name] = make_config(tmp_path / name, tiny_model_dir, stage="sft", dataset="d", dataset_dir=str(data_dir),
                                 cutoff_len=64, max_samples=None, max_steps=-1, num_train_epochs=1,
                                 per_device_train_batch_size=4, gradient_accumulation_steps=2)
        results = run(runs[name])
        assert results["num_examples"] == 30
    assert max_difference(adapter_weights(runs["plain"].output_dir), adapter_weights(runs["dropped"].output_dir)) == 0
    assert logged(runs["plain"].output_dir, "loss") == logged(runs["dropped"].output_dir, "loss")


# --------------------------------------------------------------------------------------------------
# KTO reference log-probs: what they are computed for, saved as they go, recomputed when stale


def reference_file(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "reference_logps.safetensors"))


def test_the_reference_pass_covers_only_the_examples_the_run_trains_and_evaluates(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=2, val_size=5, max_samples=29)
    results = run(config)
    stored = reference_file(config.output_dir)
    assert int(torch.isfinite(stored["train_logps"]).sum()) == 8, "2 steps of 4 train on 8 of the 24 examples"
    assert int(torch.isfinite(stored["train_kl_logps"]).sum()) == 8
    assert bool(torch.isfinite(stored["eval_logps"]).all()) and len(stored["eval_logps"]) == 5
    assert results["reference_forward_passes"] == 2 * 2  # 8 train examples in one batch of 8, 5 eval in one


def test_an_interrupted_reference_pass_is_continued_not_restarted(tmp_path, tiny_model_dir, monkeypatch):
    import prospect.reference

    common = dict(max_steps=-1, num_train_epochs=1, per_device_eval_batch_size=4)
    uninterrupted = make_config(tmp_path / "a", tiny_model_dir, **common)
    assert run(uninterrupted)["reference_forward_passes"] == 12  # 24 examples in batches of 4, targets + KL

    monkeypatch.setattr(prospect.reference, "REFERENCE_SAVE_EVERY", 1)  # save after every batch
    original, calls = prospect.reference.compute_reference_logps, []

    def crash_in_the_fourth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(prospect.reference, "compute_reference_logps", crash_in_the_fourth_batch)
    interrupted = make_config(tmp_path / "b", tiny_model_dir, **common)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(interrupted)
    assert int(torch.isfinite(reference_file(interrupted.output_dir)["train_logps"]).sum()) == 12
    assert not list(Path(interrupted.output_dir).glob("checkpoint-*"))
    monkeypatch.setattr(prospect.reference, "compute_reference_logps", original)
    resumed = run(make_config(tmp_path / "b", tiny_model_dir, **common, resume_from_checkpoint="true"))
    assert resumed["reference_forward_passes"] == 6, "only the 12 examples left are computed"
    assert torch.equal(reference_file(interrupted.output_dir)["train_logps"],
                       reference_file(uninterrupted.output_dir)["train_logps"])
    assert max_difference(adapter_weights(uninterrupted.output_dir), adapter_weights(interrupted.output_dir)) == 0


# What changes, on top of a run with cutoff_len 128 (keep_end), and what the run had instead.
REFERENCE_INPUT_CHANGES = {
    "nothing": ({}, {}),
    "cutoff_len, same tokens": ({}, {"cutoff_len": 256}),  # nothing is cut at 128 or 256: only the key differs
    "cutoff_len, other tokens": ({}, {"cutoff_len": 40}),
    "truncation_mode": ({"cutoff_len": 40}, {"cutoff_len": 40, "truncation_mode": "keep_start"}),
    "seed": ({}, {"seed": 8}),
    "template": ({}, {"template": "chatml"}),
    "bf16": ({}, {"bf16": True}),
    "data file edited": ({}, {}),
    "model replaced at the same path": ({}, {}),
}


@pytest.mark.parametrize("change", list(REFERENCE_INPUT_CHANGES))
def test_a_change_of_any_reference_input_recomputes_the_reference(tmp_path, smollm_tokenizer, monkeypatch, change):
    """A run that stopped during its reference pass is run again (the same command: output_dir holds only
    the reference file) with one input of the reference log-probs changed: nothing stored may be reused,
    and the result is that of a fresh run with the new input."""
    import prospect.reference
    from conftest import build_tiny_model_dir

    data_dir = tmp_path / "data"
    shutil.copytree(EXAMPLES_DATA, data_dir)
    model_dir = build_tiny_model_dir(tmp_path / "model", smollm_tokenizer)
    before, after = REFERENCE_INPUT_CHANGES[change]
    common = dict(max_steps=-1, num_train_epochs=1, per_device_eval_batch_size=4, dataset_dir=str(data_dir),
                  cutoff_len=128, plot_loss=False)
    monkeypatch.setattr(prospect.reference, "REFERENCE_SAVE_EVERY", 1)
    original = prospect.reference.compute_reference_logps

    def crash_after_the_second_batch(*args, calls=[], **kwargs):  # noqa: B006 (a counter kept across calls)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(prospect.reference, "compute_reference_logps", crash_after_the_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(make_config(tmp_path / "run", model_dir, **{**common, **before}))
    monkeypatch.setattr(prospect.reference, "compute_reference_logps", original)

    if change == "model replaced at the same path":  # same files, same sizes, other weights
        build_tiny_model_dir(model_dir, smollm_tokenizer, seed=1)
    if change == "data file edited":  # the same file name, one answer edited
        records = json.loads((data_dir / "signoff_kto.json").read_text())
        records[0]["messages"][-1]["content"] += " Indeed."
        (data_dir / "signoff_kto.json").write_text(json.dumps(records))
    continued = run(make_config(tmp_path / "run", model_dir, **{**common, **after}))
    fresh_config = make_config(tmp_path / "fresh", model_dir, **{**common, **after})
    fresh = run(fresh_config)
    if change == "nothing":  # the control: the 2 batches computed before the crash are reused
        assert continued["reference_forward_passes"] == fresh["reference_forward_passes"] - 2 * 2
    else:
        assert continued["reference_forward_passes"] == fresh["reference_forward_passes"], "nothing stale reused"
    assert torch.equal(reference_file(tmp_path / "run" / "out")["train_logps"],
                       reference_file(fresh_config.output_dir)["train_logps"])
    assert max_difference(adapter_weights(tmp_path / "run" / "out"), adapter_weights(fresh_config.output_dir)) == 0


@pytest.mark.parametrize("stage", ["kto", "sft"])
def test_resuming_with_other_data_or_cutoff_is_refused(tmp_path, tiny_model_dir, stage):
    first = make_config(tmp_path, tiny_model_dir, stage=stage, max_steps=4, save_steps=2, cutoff_len=128)
    run(first)
    shutil.rmtree(Path(first.output_dir) / "checkpoint-4")
    for changed in ({"cutoff_len": 40}, {"template": "chatml"}):
        with pytest.raises(UserError, match="resume_from_checkpoint: .* other settings"):
            run(make_config(tmp_path, tiny_model_dir, stage=stage, max_steps=4, save_steps=2,
                            **{"cutoff_len": 128, **changed}, resume_from_checkpoint="true"))


# --------------------------------------------------------------------------------------------------
# Checkpoints are data, never code


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, tiny_model_dir):
    import os

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=2, save_steps=2)
    run(config)
    checkpoint = Path(config.output_dir) / "checkpoint-2"
    marker = tmp_path / "code-ran"

    class Payload:  # what an attacker would plant in shared storage
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    state["planted"] = Payload()
    torch.save(state, checkpoint / "optimizer.pt")
    trainer_state = json.loads((checkpoint / "trainer_state.json").read_text())  # sizes updated: a complete folder
    trainer_state["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / "trainer_state.json").write_text(json.dumps(trainer_state))
    with pytest.raises(UserError, match=r"optimizer.pt: holds more than tensors .*posix.system.*could run code"):
        run(make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=2, save_steps=2,
                        resume_from_checkpoint=str(checkpoint)))
    assert not marker.exists()


def test_checkpoint_states_round_trip_without_pickle(tmp_path, tiny_model_dir):
    """What prospect writes is read back with weights_only=True (the resume test shows it continues exactly)."""
    config = make_config(tmp_path, tiny_model_dir, stage="kto", max_steps=1, save_steps=1)
    run(config)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        torch.load(Path(config.output_dir) / "checkpoint-1" / name, weights_only=True)
