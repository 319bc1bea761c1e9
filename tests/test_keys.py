"""Every config key is honest: read on the path its help documents, or refused with exit 2.

The train, eval and export paths are run for real with a config that records which keys are read
(writing run_config.yaml, which reads every key, is not counted). The serve, chat and Ray launch
paths are checked in their source: the module that implements them must read the key. Values a path
cannot honour are refused: those are tested through the command line for exit code 2.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from prospect.cli import main
from prospect.config import FIELDS, RunConfig, build_config
from prospect.errors import UserError
from test_train import logged, make_config

ROOT = Path(__file__).resolve().parents[1]

# Where each key is acted on. Every key must be listed once.
PATHS = {
    # read while `prospect train` runs (launch → train → data, model, tracking, checkpoints)
    "train": """model_name_or_path adapter_name_or_path trust_remote_code quantization_bit flash_attn
        enable_liger_kernel torch_compile cache_dir stage do_train finetuning_type lora_rank lora_alpha lora_dropout
        lora_target deepspeed fsdp dataset eval_dataset dataset_dir template default_system cutoff_len max_samples
        val_size overwrite_cache preprocessing_num_workers on_bad_record output_dir overwrite_output_dir
        logging_steps save_steps save_total_limit plot_loss report_to resume_from_checkpoint
        per_device_train_batch_size per_device_eval_batch_size gradient_accumulation_steps num_train_epochs
        max_steps learning_rate weight_decay adam_beta1 adam_beta2 adam_epsilon lr_scheduler_type warmup_ratio
        warmup_steps max_grad_norm bf16 fp16 gradient_checkpointing seed eval_strategy eval_steps ddp_timeout""",
    "train_kto": "pref_beta pref_ftx kto_chosen_weight kto_rejected_weight truncation_mode",  # stage: kto only
    "train_sft": "train_on_prompt mask_history",  # stage: sft only
    "eval": "eval_pattern max_new_tokens infer_dtype",
    "export": "export_dir export_size export_dtype export_overwrite",
    # checked in the module's source
    "prospect/serve.py": "host port api_key serve_batch_size temperature top_p feedback_dir",
    "prospect/chat.py": "temperature top_p max_new_tokens",
    "prospect/model.py": "quantization_type double_quantization",  # with quantization_bit: 4 (tests/test_qlora.py)
    "prospect/ray_launch.py": """ray_run_name ray_storage_path ray_num_workers resources_per_worker placement_strategy
        ray_init_kwargs ray_address ray_max_failures""",
    # its effect is on other keys, at validation (do_eval → eval_strategy; tested below)
    "config": "do_eval",
    # one allowed value, which is what it does; any other is refused (tested below)
    "refused_otherwise": "infer_backend quantization_method",
}
KEYS_OF = {path: keys.split() for path, keys in PATHS.items()}

_reads: set[str] = set()
_paused = [False]


@dataclasses.dataclass
class Recording(RunConfig):
    """A RunConfig that notes every key read from it."""

    def __getattribute__(self, name):
        # dataclasses.replace and asdict read every field to copy it: not a use
        if name in FIELDS and not _paused[0] and not sys._getframe(1).f_code.co_filename.endswith("dataclasses.py"):
            _reads.add(name)
        return super().__getattribute__(name)

    def to_dict(self):  # run_config.yaml and Ray's comparisons read every key: not a use
        _paused[0] = True
        try:
            return super().to_dict()
        finally:
            _paused[0] = False


def recording(config: RunConfig) -> Recording:
    _paused[0] = True
    try:
        return Recording(**{f.name: getattr(config, f.name) for f in dataclasses.fields(RunConfig)})
    finally:
        _paused[0] = False


def test_every_key_has_a_path():
    listed = {key for keys in KEYS_OF.values() for key in keys}
    assert set(FIELDS) - listed == set(), "a key no path acts on"
    assert listed - set(FIELDS) == set(), "not a config key"


@pytest.mark.parametrize("stage", ["sft", "kto"])
def test_training_reads_every_key_of_its_path(tmp_path, tiny_model_dir, stage):
    from prospect.launch import launch

    config = make_config(tmp_path, tiny_model_dir, stage=stage, max_steps=-1, num_train_epochs=1, max_samples=12,
                         val_size=4, report_to="none")
    _reads.clear()
    launch(recording(config))
    expected = set(KEYS_OF["train"]) | set(KEYS_OF[f"train_{stage}"])
    assert expected - _reads == set(), "keys on the training path that the run never read"


def test_eval_and_export_read_every_key_of_their_path(tmp_path, tiny_model_dir):
    from prospect.evaluate import evaluate
    from prospect.export import export_model

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=1, max_samples=12, val_size=4,
                         eval_pattern="Prospect", max_new_tokens=2, export_dir=str(tmp_path / "export"))
    from prospect.train import train

    train(config)
    _reads.clear()
    evaluate(recording(config))
    assert set(KEYS_OF["eval"]) - _reads == set()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_text("a previous export")  # export_overwrite decides
    _reads.clear()
    export_model(recording(dataclasses.replace(config, export_overwrite=True)))
    assert set(KEYS_OF["export"]) - _reads == set()


@pytest.mark.parametrize("module", [path for path in PATHS if path.endswith(".py")])
def test_serve_chat_and_ray_modules_read_their_keys(module):
    tree = ast.parse((ROOT / module).read_text())
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)}
    assert set(KEYS_OF[module]) - read == set()


# --------------------------------------------------------------------------------------------------
# Values a run cannot honour: exit 2, with what to do instead


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("do_train=false", r"do_train: false: `prospect train` only trains.*prospect eval"),
    ("do_eval=true", r"do_eval: true needs held-out data: set val_size"),
    ("infer_backend=vllm", r"infer_backend: 'vllm' is not allowed: expected one of huggingface"),
    ("quantization_method=gptq", r"quantization_method: 'gptq' is not allowed: expected one of bnb"),
    ("truncation_mode=keep_end stage=sft", r"truncation_mode: keep_end applies to stage: kto"),
    ("pref_beta=0.3 stage=sft", r"pref_beta only apply to stage: kto, but stage is sft"),
    ("train_on_prompt=true stage=kto", r"train_on_prompt only apply to stage: sft, but stage is kto"),
    ("deepspeed=ds.json", r"deepspeed: ds.json: no such file"),
    (f"deepspeed={Path(__file__).parents[1] / 'examples/deepspeed/ds_z3_config.json'}", r"ZeRO partitions over processes, and this run has one"),
    ("fsdp=full_shard", r"fsdp: shards the model over processes, and this run has one"),
    ("fp16=true", r"fp16: true needs a CUDA GPU"),
    ("do_eval=false val_size=4 eval_steps=2", r"do_eval: false, but eval_strategy / eval_steps ask for evaluations"),
])
def test_keys_a_run_cannot_honour_exit_2(tmp_path, tiny_model_dir, capsys, override, message):
    import re

    if torch.cuda.is_available() and override.startswith("fp16"):
        pytest.skip("fp16 trains on a GPU")
    config_file = tmp_path / "run.yaml"
    config_file.write_text(make_config(tmp_path, tiny_model_dir, stage="kto").to_yaml())
    code, err = run_cli(capsys, "train", str(config_file), *override.split())
    assert code == 2 and re.search(message, err), err
    assert "Traceback" not in err


def test_do_eval_false_holds_the_split_out_without_evaluating(tmp_path, tiny_model_dir):
    from prospect.train import train

    def splits(config) -> list[str]:
        return logged(config.output_dir, "split")

    held_out = make_config(tmp_path / "a", tiny_model_dir, stage="sft", max_steps=2, val_size=4, do_eval=False)
    assert train(held_out)["num_examples"] == 20 and splits(held_out) == ["train", "train"]
    evaluated = make_config(tmp_path / "b", tiny_model_dir, stage="sft", max_steps=2, val_size=4)
    train(evaluated)
    assert splits(evaluated) == ["train", "eval", "train", "eval"]  # eval_steps: logging_steps (1)


def test_ddp_timeout_is_the_timeout_of_the_torchrun_process_group(tmp_path, tiny_model_dir, monkeypatch):
    """Under torchrun (RANK/WORLD_SIZE in the environment) Accelerate creates the process group; it must
    get ddp_timeout. The group's creation is intercepted: what it was asked for is the check."""
    from datetime import timedelta

    import torch.distributed
    from accelerate.state import AcceleratorState, PartialState

    from prospect.train import train

    asked = {}

    class Created(Exception):
        pass

    def init_process_group(*args, **kwargs):
        asked.update(kwargs)
        raise Created

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    PartialState._reset_state()
    try:
        with pytest.raises(Created):
            train(make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=1, ddp_timeout=1234))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert asked["timeout"] == timedelta(seconds=1234)


def test_eval_strategy_no_is_honoured_with_held_out_data(tmp_path, tiny_model_dir):
    from prospect.train import train

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=2, val_size=4, eval_strategy="no")
    train(config)
    assert logged(config.output_dir, "split") == ["train", "train"]


def test_flash_attn_disabled_runs_the_models_eager_attention(tmp_path, tiny_model_dir, monkeypatch):
    """disabled: each packed sequence through the modeling file's own eager attention; the same
    log-probs as SDPA, and the same training."""
    import transformers.models.llama.modeling_llama as llama

    from prospect.train import train

    calls = []
    original = llama.eager_attention_forward
    monkeypatch.setattr(llama, "eager_attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    runs = {}
    for flash_attn in ("sdpa", "disabled"):
        runs[flash_attn] = make_config(tmp_path / flash_attn, tiny_model_dir, stage="kto", max_steps=2,
                                       flash_attn=flash_attn)
        before = len(calls)
        train(runs[flash_attn])
        assert (len(calls) > before) == (flash_attn == "disabled")
    assert logged(runs["disabled"].output_dir, "loss") == pytest.approx(logged(runs["sdpa"].output_dir, "loss"),
                                                                        abs=1e-6)
    from test_train import adapter_weights, max_difference

    assert max_difference(adapter_weights(runs["sdpa"].output_dir), adapter_weights(runs["disabled"].output_dir)) < 1e-5


def test_the_examples_readme_table_is_the_config_help(tmp_path):
    """examples/README.md lists every key with exactly the help `prospect` has."""
    from prospect.config import field_docs

    text = (ROOT / "examples" / "README.md").read_text()
    for key, default, help_text in field_docs():
        assert f"| `{key}` | `{default}` | {help_text} |" in text, key


def test_build_config_rejects_unknown_keys_with_the_closest_one():
    with pytest.raises(UserError, match="trunction_mode.*truncation_mode"):
        build_config({"trunction_mode": "keep_end"})
