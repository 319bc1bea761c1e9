"""Config: LLaMA-Factory keys accepted with their meaning, typed, validated, with clear errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prospect.cli import main
from prospect.config import FIELDS, RunConfig, load_config
from prospect.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"

# Every key of the compatibility contract (LLaMA-Factory v0.9.3's), and the extra keys its users expect.
CONTRACT_KEYS = """model_name_or_path trust_remote_code stage do_train finetuning_type lora_rank lora_target
pref_beta flash_attn enable_liger_kernel deepspeed dataset dataset_dir template cutoff_len max_samples
overwrite_cache preprocessing_num_workers output_dir logging_steps save_steps plot_loss overwrite_output_dir
report_to per_device_train_batch_size gradient_accumulation_steps num_train_epochs learning_rate bf16
lr_scheduler_type warmup_ratio ddp_timeout ray_run_name ray_storage_path ray_num_workers resources_per_worker
placement_strategy ray_init_kwargs lora_alpha lora_dropout kto_chosen_weight kto_rejected_weight val_size
eval_steps per_device_eval_batch_size max_steps warmup_steps seed gradient_checkpointing resume_from_checkpoint
save_total_limit adapter_name_or_path export_dir export_size train_on_prompt mask_history quantization_bit""".split()


def test_every_contract_key_is_a_field():
    assert sorted(set(CONTRACT_KEYS) - set(FIELDS)) == []


def test_reference_kto_config_parses_unchanged():
    c = load_config(str(CONFIGS / "reference_kto_lora_ray.yaml"))
    assert c.stage == "kto" and c.finetuning_type == "lora" and c.lora_rank == 8 and c.lora_alpha == 16
    assert c.lora_target == ["all"] and c.pref_beta == 0.1 and c.flash_attn == "fa2" and c.enable_liger_kernel
    assert c.dataset == ["kto_en_demo"] and c.template == "llama3" and c.cutoff_len == 1024
    assert c.learning_rate == 5e-6 and c.lr_scheduler_type == "cosine" and c.warmup_ratio == 0.1 and c.bf16
    assert c.resources_per_worker == {"GPU": 1, "accelerator_type:L40S": 0.001}
    assert c.ray_init_kwargs["runtime_env"]["env_vars"]["MLFLOW_EXPERIMENT_NAME"] == "kto-llama3"
    assert c.report_to == ["mlflow"] and c.ray_num_workers == 4 and c.ddp_timeout == 180000000
    assert c.uses_ray


def test_reference_sft_config_parses_unchanged():
    c = load_config(str(CONFIGS / "reference_sft_lora_ray.yaml"))
    assert c.stage == "sft" and c.dataset == ["identity", "alpaca_en_demo"]
    assert c.dataset_dir == "REMOTE:llamafactory/demo_data" and c.report_to == ["none"]
    assert c.per_device_train_batch_size == 1 and c.gradient_accumulation_steps == 8 and c.num_train_epochs == 3.0


def test_example_configs_parse():
    for name in ("kto_lora.yaml", "sft_lora.yaml"):
        assert load_config(str(ROOT / "examples" / name)).model_name_or_path == "smollm2-135m-instruct"


def test_overrides_are_typed_like_yaml():
    c = load_config(str(ROOT / "examples" / "kto_lora.yaml"),
                    ["learning_rate=1e-4", "dataset=a,b", "lora_target=q_proj, v_proj", "bf16=true",
                     "resources_per_worker={GPU: 1}", "resume_from_checkpoint=true", "template=auto"])
    assert c.learning_rate == 1e-4 and c.dataset == ["a", "b"] and c.lora_target == ["q_proj", "v_proj"]
    assert c.bf16 is True and c.resources_per_worker == {"GPU": 1} and c.resume_from_checkpoint == "true"
    assert c.template is None  # auto = the tokenizer's own template


def test_defaults_match_what_users_expect():
    c = RunConfig().validate()
    assert (c.lora_rank, c.lora_alpha, c.lora_dropout, c.cutoff_len, c.seed) == (8, 16, 0.0, 2048, 42)
    assert (c.kto_chosen_weight, c.kto_rejected_weight, c.pref_beta) == (1.0, 1.0, 0.1)
    assert c.on_bad_record == "error" and c.report_to == ["none"] and not c.uses_ray


@pytest.mark.parametrize(
    "override, expected",
    [
        ("learning_rat=1e-4", ["unknown config key 'learning_rat'", "did you mean 'learning_rate'"]),
        ("stage=dpo", ["stage", "'dpo'", "one of sft, kto"]),
        ("lora_rank=0", ["lora_rank", "0", ">= 1"]),
        ("cutoff_len=long", ["cutoff_len", "'long'", "an integer"]),
        ("lora_dropout=1.5", ["lora_dropout", "1.5", "[0.0, 1.0]"]),
        ("pref_beta=0", ["pref_beta", "> 0.0"]),
        ("flash_attn=fa3", ["flash_attn", "auto, disabled, sdpa, fa2"]),
        ("report_to=comet", ["report_to", "comet"]),
        ("quantization_bit=3", ["quantization_bit", "one of 4, 8"]),
        ("val_size=2.5", ["val_size", "2.5"]),
        ("resources_per_worker=[1]", ["resources_per_worker", "a mapping"]),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override, expected):
    with pytest.raises(UserError) as err:
        load_config(str(ROOT / "examples" / "kto_lora.yaml"), [override])
    for text in expected:
        assert text in str(err.value)


def test_cross_field_rules():
    with pytest.raises(UserError, match="bf16 and fp16"):
        load_config(None, ["bf16=true", "fp16=true"])
    with pytest.raises(UserError, match="adapter_name_or_path needs finetuning_type: lora"):
        load_config(None, ["finetuning_type=full", "adapter_name_or_path=some/adapter"])
    assert load_config(None, ["val_size=0.1"]).eval_strategy == "steps"


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: kto\n  lora_rank: 8\n")
    with pytest.raises(UserError, match=r"bad.yaml: line 2, column \d+: not valid YAML"):
        load_config(str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- stage: kto\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(str(listed))


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stage: kto\nlearning_rat: 1.0e-4\n")
    result = subprocess.run([sys.executable, "-m", "prospect", "data", "check", str(cfg)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "cfg.yaml: unknown config key 'learning_rat'; did you mean 'learning_rate'?" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_bad_override_exits_2(capsys):
    assert main(["data", "check", str(ROOT / "examples" / "kto_lora.yaml"), "lora_rank"]) == 2
    assert "override 'lora_rank' is not key=value" in capsys.readouterr().err


def test_import_is_light():
    code = ("import time; t = time.perf_counter(); import prospect, prospect.cli, prospect.config; "
            "import sys; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate') if m in sys.modules]; "
            "print(dt, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert float(out[0]) < 1.0
    assert out[1].strip() == "[]"


def test_examples_readme_lists_every_key():
    text = (ROOT / "examples" / "README.md").read_text()
    missing = [key for key in FIELDS if f"| `{key}` |" not in text]
    assert missing == []


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_train_sets_the_allocator_before_torch_is_imported(preset, expected):
    """prospect train sets THP_MEM_ALLOC_ENABLE (prospect.allocator.ALLOCATOR_ENV), which PyTorch reads at its
    first allocation, before anything imports torch; a value the user set wins."""
    code = ("import os, sys; import prospect.cli as cli, prospect.launch as launch; "
            "launch.launch = lambda config: print('torch' in sys.modules, os.environ['THP_MEM_ALLOC_ENABLE']); "
            "cli.main(['train', 'examples/kto_lora.yaml'])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    assert out.stdout.split() == ["False", expected]


def test_yaml_no_is_the_choice_no(tmp_path):
    """YAML 1.1 reads an unquoted `no` as false: `eval_strategy: no` (HF Trainer's value) must still mean no."""
    from prospect.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("eval_strategy: no\n")
    assert load_config(str(path)).eval_strategy == "no"
    assert load_config(None, ["eval_strategy=no"]).eval_strategy == "no"
