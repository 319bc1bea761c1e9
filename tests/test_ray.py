"""Training on Ray Train, tested like a cluster: two real Ray nodes on this machine, 2 CPU workers (gloo).

The module starts a head node (`ray start --head`) and a second node (`ray start --address`, with its
own resources), connects once, and shares a few runs between tests, because each Ray run costs tens
of seconds on two cores (fresh worker processes import torch). The runs, on a tiny random Llama:

    reference   1 process  × micro-batch 2 × accumulation 2, train() in this process
    sft         2 Ray workers × micro-batch 2, uninterrupted
    killed      the same, but rank 1 SIGKILLs itself after checkpoint-4 (ray_max_failures: 1)
    cli         the same through `python -m prospect train`, driver SIGKILLed mid-run, then re-run
    kto         KTO, the two workers on different nodes (STRICT_SPREAD)

Worker-side test code lives in tests/ray_helpers.py (see its docstring); prospect carries no test hook.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from prospect import checkpoints
from prospect.config import build_config
from prospect.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DATA = ROOT / "examples" / "data"

# The test cluster: no token auth (it listens on this machine only), Ray's controller polls its
# workers every 0.5 s (default 2 s: faster ends and failure detection), a node stops at once.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_DEDUP_LOGS_SKIP_REGEX": "State API may be temporarily unavailable",
}
GREETING = "hello from the YAML"

# A hung cluster must fail the test, not hang CI (the first test also starts the cluster and two runs).
pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------------------------------
# The cluster and the shared runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    # `--block` keeps `ray start` in the foreground: ending that one process (by its PID) stops the
    # node's processes, and nothing else on this machine (`ray stop` would stop every Ray node here).
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
                             *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _stop_node(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """Address of a two-node Ray cluster on this machine; this process is connected to it."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for name, value in CLUSTER_ENV.items():
            mp.setenv(name, value)
        # A short private temp dir: Ray's socket paths must stay under ~100 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="pr-", dir="/tmp"))
        env = dict(os.environ)
        port = _free_port()
        address = f"127.0.0.1:{port}"
        head = _start_node(["--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                            f"--ray-client-server-port={_free_port()}",
                            f"--dashboard-agent-listen-port={_free_port()}"], temp_dir / "head.log", env)
        nodes = [head]
        try:
            _wait_for_port(port, head, temp_dir / "head.log")
            ray.init(address=address)
            nodes.append(_start_node([f"--address={address}", "--num-cpus=2", '--resources={"second_node": 2}',
                                      f"--dashboard-agent-listen-port={_free_port()}"], temp_dir / "node2.log", env))
            deadline = time.monotonic() + 60
            while len([n for n in ray.nodes() if n["Alive"]]) < 2:
                assert time.monotonic() < deadline, (temp_dir / "node2.log").read_text()[-2000:]
                time.sleep(0.5)
            yield address
        finally:
            ray.shutdown()
            for node in reversed(nodes):
                _stop_node(node)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


def run_values(workdir: Path, model_dir: Path, name: str, env: dict | None = None, **overrides) -> dict:
    """A small run, as YAML values: 24 examples, 6 steps of 4 examples, a checkpoint every 2 steps."""
    stage = overrides.get("stage", "sft")
    env_vars = {"PROSPECT_TEST_GREETING": GREETING, "PROSPECT_TEST_RECORD_DIR": str(records_dir(workdir, name)),
                **(env or {})}
    values = {
        "model_name_or_path": str(model_dir), "stage": stage,
        "dataset": "signoff_kto" if stage == "kto" else "signoff_sft", "dataset_dir": str(EXAMPLES_DATA),
        "template": "auto", "cutoff_len": 256, "max_samples": 24,
        "output_dir": str(workdir / name / "output"), "cache_dir": str(workdir / "cache"),
        "overwrite_output_dir": True,  # as in the reference configs: re-running must still resume
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 8, "learning_rate": 5e-3,
        "lr_scheduler_type": "constant", "max_steps": 6, "logging_steps": 1, "save_steps": 2, "plot_loss": True,
        "lora_rank": 4, "seed": 7,
        "ray_num_workers": 2, "ray_storage_path": str(workdir / "storage"), "ray_run_name": name,
        "ray_init_kwargs": {"runtime_env": {"env_vars": env_vars}},
    }
    values.update(overrides)
    return values


def run_config(workdir: Path, model_dir: Path, name: str, env: dict | None = None, **overrides):
    return build_config(run_values(workdir, model_dir, name, env, **overrides), source="test")


def records_dir(workdir: Path, name: str) -> Path:
    folder = workdir / name / "records"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_records(workdir: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(records_dir(workdir, name).glob("*.json"))]


def launch_with_helpers(config):
    """launch_on_ray with the test wrapper of tests/ray_helpers.py as each worker's loop."""
    import ray.cloudpickle

    import ray_helpers
    from prospect.ray_launch import launch_on_ray

    ray.cloudpickle.register_pickle_by_value(ray_helpers)  # the workers cannot import tests/
    return launch_on_ray(config, train_loop=ray_helpers.train_loop)


@pytest.fixture(scope="module")
def sft_runs(cluster, workdir, tiny_model_dir):
    """The 1-process reference run and the uninterrupted 2-worker Ray run."""
    from prospect.train import train

    reference = run_config(workdir, tiny_model_dir, "reference", ray_num_workers=1, gradient_accumulation_steps=2)
    train(reference)
    config = run_config(workdir, tiny_model_dir, "sft")
    results = launch_with_helpers(config)
    return {"reference": Path(reference.output_dir), "run": run_folder(config), "output": Path(config.output_dir),
            "results": results}


def run_folder(config) -> Path:
    return Path(config.ray_storage_path) / config.ray_run_name


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train_losses(folder: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if line["split"] == "train"}


def registered_checkpoints(folder: Path) -> list[str]:
    """The checkpoints Ray registered in a run folder (its snapshot can be mid-rewrite: retry)."""
    for _ in range(50):
        try:
            snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
            return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    return []


# --------------------------------------------------------------------------------------------------
# Data-parallel training and storage


@pytest.mark.slow
def test_two_workers_train_like_one_process_with_accumulation(sft_runs):
    ray_losses, local_losses = train_losses(sft_runs["run"]), train_losses(sft_runs["reference"])
    assert sorted(ray_losses) == sorted(local_losses) == [1, 2, 3, 4, 5, 6]
    for step in local_losses:
        assert ray_losses[step] == pytest.approx(local_losses[step], abs=1e-5), step
    assert max_difference(adapter(sft_runs["run"]), adapter(sft_runs["reference"])) <= 1e-5
    assert sft_runs["results"]["world_size"] == 2 and sft_runs["results"]["num_steps"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed-zero3"])
def test_two_sharded_workers_train_like_one_process(sft_runs, workdir, tiny_model_dir, engine):
    """fsdp: full_shard, or deepspeed: ds_z3_config.json, under Ray: each of the 2 CPU workers holds half the
    weights; the same run as one process."""
    from prospect.ray_launch import launch_on_ray

    if engine == "fsdp2":
        settings = dict(fsdp="full_shard")
    else:
        pytest.importorskip("deepspeed")
        settings = dict(deepspeed=str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json"))
    config = run_config(workdir, tiny_model_dir, f"sft-{engine}", **settings)
    results = launch_on_ray(config)
    ray_losses, local_losses = train_losses(run_folder(config)), train_losses(sft_runs["reference"])
    assert sorted(ray_losses) == sorted(local_losses) == [1, 2, 3, 4, 5, 6]
    for step in local_losses:
        assert ray_losses[step] == pytest.approx(local_losses[step], abs=1e-5), step
    assert max_difference(adapter(run_folder(config)), adapter(sft_runs["reference"])) <= 1e-5
    assert results["world_size"] == 2
    assert results["parameters_per_process"] < 0.55 * sft_runs["results"]["parameters_per_process"]
    if engine != "fsdp2":
        assert (run_folder(config) / "checkpoint-6" / "deepspeed").is_dir(), "the engine's checkpoint reaches storage"


@pytest.mark.slow
def test_runtime_env_vars_from_the_yaml_reach_every_worker(sft_runs, workdir):
    records = read_records(workdir, "sft")
    assert sorted(r["rank"] for r in records) == [0, 1]
    assert all(r["env"]["PROSPECT_TEST_GREETING"] == GREETING for r in records)
    assert all(r["env"]["THP_MEM_ALLOC_ENABLE"] == "1" for r in records), "the allocator setting of prospect.launch"


@pytest.mark.slow
def test_storage_holds_complete_checkpoints_that_load_with_plain_peft(sft_runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = sft_runs["run"]
    assert registered_checkpoints(run) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "run_config.yaml",
                 "metrics.jsonl", "train_results.json", "training_loss.png"):
        assert (run / name).is_file(), name
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    for name in registered_checkpoints(run):
        folder = run / name
        state = json.loads((folder / checkpoints.STATE_FILE).read_text())
        assert checkpoints.is_complete(folder) and state["step"] == int(name.split("-")[1])
        assert {"optimizer.pt", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt", "metrics.jsonl"} <= {
            p.name for p in folder.iterdir()}
        model = PeftModel.from_pretrained(base, str(folder))
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert loaded and all(torch.equal(v, adapter(folder)[k.replace(".default", "")]) for k, v in loaded.items())
        base = model.unload()
    assert max_difference(adapter(run / "checkpoint-6"), adapter(run)) == 0
    # Checkpoints live in storage only: the worker's local copies were removed once Ray had them.
    assert not list(sft_runs["output"].glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------------
# Fault tolerance


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(sft_runs, workdir, tiny_model_dir):
    config = run_config(workdir, tiny_model_dir, "killed", env={"PROSPECT_TEST_KILL": "1:4"}, ray_max_failures=1)
    results = launch_with_helpers(config)

    records = read_records(workdir, "killed")
    first = [r for r in records if r["first_attempt"]]
    second = [r for r in records if not r["first_attempt"]]
    assert sorted(r["rank"] for r in first) == sorted(r["rank"] for r in second) == [0, 1]
    assert results["resumed_from_step"] == 4  # the restarted group continued from checkpoint-4
    run = run_folder(config)
    assert max_difference(adapter(run), adapter(sft_runs["run"])) <= 1e-6
    assert train_losses(run) == pytest.approx(train_losses(sft_runs["run"]), abs=1e-6)


@pytest.mark.slow
def test_rerunning_after_the_driver_was_killed_resumes_and_skips_half_written_checkpoints(
        sft_runs, cluster, workdir, tiny_model_dir):
    import ray

    values = run_values(workdir, tiny_model_dir, "cli")
    config_file = workdir / "cli.yaml"
    config_file.write_text(yaml.safe_dump(values))
    run, output = Path(values["ray_storage_path"]) / "cli", Path(values["output_dir"])
    env = {**os.environ, "RAY_ADDRESS": cluster}
    command = [sys.executable, "-m", "prospect", "train", str(config_file)]

    # A slow controller poll (3 s) keeps the run going for seconds after its first checkpoint.
    driver = subprocess.Popen(command, cwd=ROOT, env={**env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "checkpoint_manager_snapshot.json").exists() and registered_checkpoints(run)):
            assert driver.poll() is None and time.monotonic() < deadline, "the first run ended before a checkpoint"
            time.sleep(0.1)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    deadline = time.monotonic() + 60  # Ray ends the dead driver's job: its workers and their CPUs
    while ray.available_resources().get("CPU", 0) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    latest = registered_checkpoints(run)[-1]
    assert latest in ("checkpoint-2", "checkpoint-4"), "the driver must die mid-run"

    # A crash while saving the next checkpoint: half of it in output_dir, half copied to storage (the
    # kill may have left that already: Ray copies a checkpoint before it registers it).
    step = int(latest.split("-")[1]) + 2
    half = output / f".checkpoint-{step}.tmp"
    half.mkdir(parents=True, exist_ok=True)
    (half / "adapter_model.safetensors").write_bytes(b"partial")
    copied = run / f"checkpoint-{step}"
    copied.mkdir(exist_ok=True)
    for source in (run / latest).iterdir():
        (copied / source.name).write_bytes(source.read_bytes()[: source.stat().st_size // 2 or 1])
    (copied / checkpoints.STATE_FILE).write_text((run / latest / checkpoints.STATE_FILE).read_text())
    with pytest.raises(UserError, match="not a complete checkpoint"):
        checkpoints.resolve_resume(str(copied), str(output))

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming the Ray run {run} from {latest}" in rerun.stdout
    results = json.loads((run / "train_results.json").read_text())
    assert results["resumed_from_step"] == step - 2
    assert not half.exists()  # removed at the start of the re-run, never read
    assert max_difference(adapter(run), adapter(sft_runs["run"])) <= 1e-6
    assert train_losses(run) == pytest.approx(train_losses(sft_runs["run"]), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# KTO across two nodes


@pytest.mark.slow
def test_kto_runs_on_two_workers_on_two_nodes_and_continues_a_lost_reference_pass(cluster, workdir, tiny_model_dir):
    """KTO across two nodes; rank 0 is killed during the reference pass, after its first save (16 of the 24
    examples): the restarted group continues the pass (8 examples left, one batch per rank) and ends as a
    one-process run with accumulation does."""
    from prospect.train import train

    config = run_config(workdir, tiny_model_dir, "kto", stage="kto", placement_strategy="STRICT_SPREAD",
                        env={"PROSPECT_TEST_KILL_REFERENCE": "1"}, ray_max_failures=1)
    results = launch_with_helpers(config)

    records = read_records(workdir, "kto")
    assert len({r["node_id"] for r in records}) == 2, "STRICT_SPREAD puts one worker on each node"
    assert (records_dir(workdir, "kto") / "reference-killed").is_file() and len(records) == 4, "one restart"
    assert results["world_size"] == 2 and results["num_steps"] == 6
    assert results["reference_forward_passes"] == 2, "the restarted rank 0 computed only the 8 examples left"
    single = run_config(workdir, tiny_model_dir, "kto-single", stage="kto", ray_num_workers=1,
                        gradient_accumulation_steps=2)
    assert train(single)["reference_forward_passes"] == 2 * 3  # 24 examples in batches of 8
    run = run_folder(config)
    assert max_difference(adapter(run), adapter(Path(single.output_dir))) <= 1e-5
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # LoRA B starts at 0: policy = reference
    assert all(k in lines[-1] for k in ("kl", "grad_norm", "loss"))
    for name in ("checkpoint-6", "."):
        assert (run / name / "reference_logps.safetensors").is_file()
    assert (run / "training_rewards.png").is_file()


# --------------------------------------------------------------------------------------------------
# What is decided before any worker starts (no cluster needed)


def test_gpu_only_options_on_cpu_workers_are_a_user_error_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    from prospect.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    reference = ROOT / "tests" / "configs" / "reference_kto_lora_ray.yaml"
    code = main(["train", str(reference), "resources_per_worker={}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    # the reference config's deepspeed: examples/deepspeed/ds_z3_config.json runs on CPU workers; its GPU kernels do not
    assert code == 2 and "enable_liger_kernel" in err and "GPU" in err and "Traceback" not in err
    assert "deepspeed" not in err


def test_a_changed_config_needs_overwrite_or_a_new_run_name(tmp_path, capsys):
    from prospect.ray_launch import _decide_resume, _resolved
    from prospect.ray_worker import RAY_SNAPSHOT_FILE, RunFolder

    def config(**overrides):
        values = {"output_dir": str(tmp_path / "out"), "ray_storage_path": str(tmp_path / "storage"),
                  "ray_run_name": "run", "ray_num_workers": 2, "learning_rate": 1e-4, **overrides}
        return _resolved(build_config(values))

    storage = RunFolder(str(tmp_path / "storage"), "run")
    storage.write_text("run_config.yaml", config().to_yaml())
    storage.write_text(RAY_SNAPSHOT_FILE, json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint-4", "metrics": {"step": 4}}}))

    _decide_resume(config(logging_steps=1, ray_max_failures=3), storage)  # not a training setting: resume
    assert "from checkpoint-4" in capsys.readouterr().out
    # The same global batch from other factors is the same run.
    _decide_resume(config(ray_num_workers=1, gradient_accumulation_steps=2), storage)
    with pytest.raises(UserError, match="learning_rate"):
        _decide_resume(config(learning_rate=2e-4), storage)
    with pytest.raises(UserError, match="global batch size 16 → 32"):
        _decide_resume(config(ray_num_workers=4), storage)
    _decide_resume(config(learning_rate=2e-4, overwrite_output_dir=True), storage)
    assert storage.latest_checkpoint() is None and "replacing" in capsys.readouterr().out
    with pytest.raises(UserError, match="holds no registered checkpoint"):
        _decide_resume(config(resume_from_checkpoint=True), storage)


def test_a_user_error_in_a_worker_reaches_the_command_line_as_one():
    from ray.train import WorkerGroupError

    from prospect.ray_launch import _plain_error

    failed = WorkerGroupError("rank 0 failed", {0: UserError("dataset \"x\" is not in dataset_info.json"),
                                                 1: RuntimeError("Connection closed by peer")})
    error = _plain_error(failed)
    assert isinstance(error, UserError) and str(error) == 'dataset "x" is not in dataset_info.json'
    error = _plain_error(WorkerGroupError("boom", {1: RuntimeError("out of memory")}))
    assert isinstance(error, RuntimeError) and "rank 1: RuntimeError: out of memory" in str(error)


def test_a_worker_progress_bar_becomes_log_lines():
    import io

    from tqdm import tqdm

    from prospect.ray_worker import _ProgressLines

    sink = io.StringIO()
    stream = _ProgressLines(sink, every_s=3600)
    bar = tqdm(total=50, desc="train", file=stream, mininterval=0)
    for _ in range(50):
        bar.update(1)
        bar.set_postfix(loss=1.0)
    bar.close()
    lines = sink.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("train:   0%") and lines[1].startswith("train: 100%")
