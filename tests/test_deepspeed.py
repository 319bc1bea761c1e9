"""DeepSpeed ZeRO (`deepspeed: examples/deepspeed/ds_z3_config.json`, through Accelerate's integration) on 2
CPU processes over gloo, against DDP on the same 2 processes: the same losses, the same adapter or
weights (to 1e-5), for SFT and KTO, LoRA and full fine-tuning, ZeRO-3 and ZeRO-2 (ZeRO-1 once); a run
crashed and resumed from the engine's checkpoint equal to the uninterrupted one; the result loads in
plain PEFT / transformers. The oracle, DDP, shares the loop but not the engine: DeepSpeed partitions the
optimizer state (and under ZeRO-3 the weights), reduces gradients in its own buckets, clips and steps
its own flat float32 copies, and fills its JSON's "auto" values from the YAML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prospect.cli import main
from test_sharding import assert_loads_without_the_engine, torchrun, weights
from test_train import ROOT, logged, make_config, max_difference

pytest.importorskip("deepspeed", reason="deepspeed is in the dev extras: pip install -e '.[dev]'")

CONFIGS = ROOT / "examples" / "deepspeed"
CASES = [("sft", "lora", 3), ("kto", "lora", 3), ("sft", "full", 3), ("kto", "full", 3), ("sft", "full", 2),
         ("kto", "full", 2), ("kto", "lora", 2), ("sft", "lora", 1)]
RESUMED = [("kto", "lora", 3), ("kto", "full", 3), ("sft", "full", 2)]


# Below some of each case's gradient norms, so that DeepSpeed's own clipping is tested
MAX_GRAD_NORM = {("sft", "lora"): 0.35, ("kto", "lora"): 0.08, ("sft", "full"): 2.5, ("kto", "full"): 0.6}


def common(stage: str, method: str) -> dict:
    values = dict(stage=stage, finetuning_type=method, max_steps=4, per_device_train_batch_size=2, save_steps=2,
                  learning_rate=1e-3 if method == "lora" else 1e-4, lora_dropout=0.0,
                  max_grad_norm=MAX_GRAD_NORM[stage, method],
                  gradient_accumulation_steps=2 if stage == "sft" else 1, lr_scheduler_type="linear",
                  warmup_steps=1)
    if stage == "kto":  # 13 examples in steps of 4: the last step leaves rank 1 a stand-in; eval batches uneven
        values.update(max_samples=22, val_size=9, eval_steps=2, per_device_eval_batch_size=4)
    return values


def zero_config(folder: Path, stage: int) -> str:
    """LLaMA-Factory's ds_z{2,3}_config.json (here: examples/deepspeed/), as a user brings it; stage 1 from stage 2's."""
    if stage > 1:
        return str(CONFIGS / f"ds_z{stage}_config.json")
    settings = json.loads((CONFIGS / "ds_z2_config.json").read_text())
    settings["zero_optimization"]["stage"] = 1
    path = folder / "ds_z1_config.json"
    path.write_text(json.dumps(settings))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Every case trained on 2 processes with DDP and with DeepSpeed, and a DeepSpeed run of each stage
    crashed in step 3 and resumed from its checkpoint of step 2, all in one torchrun."""
    root = tmp_path_factory.mktemp("deepspeed")
    configs, arguments = {}, []

    def add(key, name, folder=None, **values):
        config = make_config(root / (folder or name), tiny_model_dir, **values)
        (root / f"{name}.yaml").write_text(config.to_yaml())
        configs[key] = config
        return str(root / f"{name}.yaml")

    for stage, method, zero in CASES:
        name = f"{stage}-{method}-z{zero}"
        arguments.append(add((stage, method, zero, "ddp"), f"{name}-ddp", **common(stage, method)))
        arguments.append(add((stage, method, zero, "deepspeed"), name, **common(stage, method),
                             deepspeed=zero_config(root, zero)))
    for stage, method, zero in RESUMED:
        name = f"{stage}-{method}-z{zero}-resumed"
        crash = add(None, f"{name}-crash", name, **common(stage, method), deepspeed=zero_config(root, zero))
        arguments += [f"{crash}@3", add((stage, method, zero, "resumed"), name, **common(stage, method),
                                        deepspeed=zero_config(root, zero), resume_from_checkpoint="true")]
    torchrun(arguments, port=29531)
    return configs


def stepped(folder, key: str) -> list[float]:
    """`key` of every logged training step (evaluations log no grad_norm or learning_rate)."""
    rows = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if row["split"] == "train"]


def results(folder) -> dict:
    return json.loads((Path(folder) / "train_results.json").read_text())


@pytest.mark.parametrize("stage,method,zero", CASES)
def test_deepspeed_equals_ddp_on_two_processes(runs, stage, method, zero):
    ddp, deepspeed = runs[stage, method, zero, "ddp"].output_dir, runs[stage, method, zero, "deepspeed"].output_dir
    assert logged(deepspeed, "loss") == pytest.approx(logged(ddp, "loss"), abs=1e-5)
    assert len(logged(deepspeed, "loss")) == (4 if stage == "sft" else 6)  # KTO: 4 steps and 2 evaluations
    # the engine's own clipping reports the norm before clipping, as the loop does under DDP
    assert stepped(deepspeed, "grad_norm") == pytest.approx(stepped(ddp, "grad_norm"), rel=1e-4)
    assert max(stepped(ddp, "grad_norm")) > MAX_GRAD_NORM[stage, method], "some steps must be clipped"
    assert stepped(deepspeed, "learning_rate") == pytest.approx(stepped(ddp, "learning_rate"), rel=1e-6)
    difference = max_difference(weights(deepspeed), weights(ddp))
    assert difference <= 1e-5, difference
    assert max_difference(weights(deepspeed), weights(Path(deepspeed) / "checkpoint-4")) == 0.0
    assert max_difference(weights(deepspeed), weights(Path(deepspeed) / "checkpoint-2")) > 1e-4, \
        "the weights must move between checkpoints"
    run, oracle = results(deepspeed), results(ddp)
    assert run["world_size"] == oracle["world_size"] == 2
    held, whole = run["parameters_per_process"], oracle["parameters_per_process"]
    if zero == 3:
        assert 0.45 * whole < held < 0.55 * whole, "under ZeRO-3 each process holds about half of the weights"
    else:
        assert held == whole


@pytest.mark.parametrize("stage,method,zero", RESUMED)
def test_a_deepspeed_run_resumes_from_its_checkpoint(runs, stage, method, zero):
    uninterrupted, resumed = runs[stage, method, zero, "deepspeed"].output_dir, runs[stage, method, zero, "resumed"]
    assert results(resumed.output_dir)["resumed_from_step"] == 2
    assert max_difference(weights(resumed.output_dir), weights(uninterrupted)) <= 1e-6
    assert logged(resumed.output_dir, "loss")[-1] == pytest.approx(logged(uninterrupted, "loss")[-1], abs=1e-6)
    assert (Path(resumed.output_dir) / "checkpoint-4" / "deepspeed").is_dir()


def test_the_deepspeed_result_loads_in_plain_peft_and_transformers(runs):
    assert_loads_without_the_engine(runs["sft", "lora", 3, "deepspeed"], runs["sft", "full", 3, "deepspeed"])


def test_a_deepspeed_checkpoint_resumes_only_as_it_was_written(runs, tmp_path, capsys):
    """DeepSpeed's optimizer state is one file per process: another process count or engine is refused."""
    written = runs["kto", "lora", 3, "resumed"]
    (tmp_path / "out").mkdir()
    shutil.copytree(Path(written.output_dir) / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    config = make_config(tmp_path, written.model_name_or_path, **{**common("kto", "lora"), "gradient_accumulation_steps": 2},
                         resume_from_checkpoint="true")
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "was written by DeepSpeed ZeRO-3 on 2 processes; this run is without DeepSpeed" in err, err
    assert "Traceback" not in err


def write_json(folder: Path, name: str, settings) -> str:
    path = folder / name
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return str(path)


def z3(**zero) -> dict:
    settings = json.loads((CONFIGS / "ds_z3_config.json").read_text())
    settings["zero_optimization"].update(zero)
    return settings


@pytest.mark.parametrize("settings,overrides,message", [
    (None, {}, "ZeRO partitions over processes, and this run has one"),
    ("missing", {}, "no such file"),
    ("{ not json", {}, "is not valid JSON"),
    ({**z3(), "optimizer": {"type": "AdamW"}}, {}, '"optimizer": prospect builds AdamW'),
    ({**z3(), "scheduler": {"type": "WarmupLR"}}, {}, '"scheduler": prospect builds AdamW'),
    (z3(stage=0), {}, "zero_optimization.stage must be 1, 2 or 3"),
    (z3(offload_optimizer={"device": "gpu"}), {}, "must be none, cpu or nvme"),
    (z3(offload_optimizer={"device": "cpu"}), {}, "this run is on CPU already"),
    (None, {"fsdp": "full_shard"}, "two sharding engines"),
])
def test_deepspeed_that_cannot_run_here_exits_2_with_the_reason(tmp_path, tiny_model_dir, capsys, settings,
                                                                 overrides, message):
    path = str(CONFIGS / "ds_z3_config.json") if settings is None else \
        str(tmp_path / "absent.json") if settings == "missing" else write_json(tmp_path, "ds.json", settings)
    config_path = tmp_path / "run.yaml"
    values = make_config(tmp_path, tiny_model_dir, stage="sft").to_dict()
    config_path.write_text(json.dumps({**values, "deepspeed": path, **overrides}))
    code = main(["train", str(config_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("overrides,zero,message", [
    (dict(quantization_bit=4), 3, "ZeRO over 4/8-bit bitsandbytes weights is not built"),
    (dict(torch_compile=True), 2, "with torch_compile: not built together"),
])
def test_combinations_not_built_with_deepspeed_exit_2_on_two_processes(tiny_model_dir, tmp_path, overrides, zero,
                                                                         message):
    from prospect.errors import UserError
    from prospect.sharding import check_sharding

    config = make_config(tmp_path, tiny_model_dir, stage="sft", deepspeed=zero_config(tmp_path, zero), **overrides)
    with pytest.raises(UserError, match=message):
        check_sharding(config, torch.device("cpu"), world_size=2)
    check_sharding(make_config(tmp_path, tiny_model_dir, stage="sft", deepspeed=zero_config(tmp_path, zero)),
                   torch.device("cpu"), 2)


@pytest.mark.parametrize("given,message", [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4, but the YAML makes it 2"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8, but the YAML makes it 3"),
    ({"train_batch_size": 64}, "train_batch_size is 64, but the YAML makes it 30 (the global batch)"),
    ({"gradient_clipping": 1.0}, "gradient_clipping is 1.0, but the YAML makes it 0.3"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is True, but the YAML makes it False"),
])
def test_the_jsons_values_must_agree_with_the_yaml(tmp_path, tiny_model_dir, given, message):
    from prospect.errors import UserError
    from prospect.sharding import deepspeed_settings

    path = write_json(tmp_path, "ds.json", {**z3(), **given})
    config = make_config(tmp_path, tiny_model_dir, stage="sft", deepspeed=path, per_device_train_batch_size=3,
                         gradient_accumulation_steps=2, max_grad_norm=0.3)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deepspeed_settings(config, world_size=5, hidden_size=64)


def test_the_auto_values_are_filled_from_the_yaml(tmp_path, tiny_model_dir):
    from prospect.sharding import deepspeed_settings

    config = make_config(tmp_path, tiny_model_dir, stage="sft", deepspeed=str(CONFIGS / "ds_z3_config.json"),
                         per_device_train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.3, bf16=True)
    settings = deepspeed_settings(config, world_size=5, hidden_size=64)
    assert (settings["train_micro_batch_size_per_gpu"], settings["gradient_accumulation_steps"],
            settings["train_batch_size"], settings["gradient_clipping"]) == (3, 2, 30, 0.3)
    assert settings["bf16"]["enabled"] is True and settings["fp16"]["enabled"] is False
    zero = settings["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert zero["stage3_max_live_parameters"] == 1e9  # what the user wrote stays
    assert "auto" not in json.dumps(settings)


def test_a_lora_run_that_trains_the_head_under_zero3_exits_2(runs, tmp_path):
    """The head then runs as a LoRA module, once per chunk of log-probs: refused, not left to hang."""
    config = make_config(tmp_path, runs["sft", "lora", 3, "ddp"].model_name_or_path, **common("sft", "lora"),
                         deepspeed=zero_config(tmp_path, 3), lora_target="q_proj,lm_head")
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml())
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                           "-m", "prospect", "train", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-2000:]  # the workers' exit code
    assert "ZeRO-3 with an output head trained inside a LoRA run" in done.stderr + done.stdout
