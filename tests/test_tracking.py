"""Tracking: metrics.jsonl, the plots, and MLflow / TensorBoard / W&B read back with their own clients."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import shutil
import struct
import sys
import types
import warnings
from pathlib import Path

import pytest

from prospect.config import load_config
from prospect.errors import UserError
from prospect.objectives.kto import KTO
from prospect.objectives.sft import SFT
from prospect.tracking import METRICS_FILE, Tracker, flat_params, mlflow_name, read_metrics


def make_config(output_dir: Path, *overrides: str):
    return load_config(None, [f"output_dir={output_dir}", *overrides])


def kto_metrics(step: int) -> dict:
    return {
        "loss": 0.7 * math.exp(-step / 10),
        "rewards/chosen": 0.01 * step,
        "rewards/rejected": -0.02 * step,
        "rewards/margins": 0.03 * step,
        "kl": 0.1 + 0.001 * step,
        "learning_rate": 1e-4,
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def no_mlflow_env(monkeypatch, tmp_path):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow might write relative to the cwd lands in tmp_path


@pytest.fixture(scope="module")
def empty_mlflow_db(request, tmp_path_factory) -> Path:
    """An empty MLflow SQLite store (schema only). Creating one runs ~5 s of migrations, so it is
    made once and kept in pytest's cache folder, keyed by the mlflow version; tests copy it."""
    mlflow = pytest.importorskip("mlflow")
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = Path(cache.mkdir(f"mlflow-empty-db-{mlflow.__version__}")) if cache else tmp_path_factory.mktemp("mlflow")
    path = folder / "mlflow.db"
    if not path.is_file():
        staging = folder / f"mlflow.db.tmp{os.getpid()}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mlflow's own SQLAlchemy deprecation warning
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{staging}").search_experiments()
        os.replace(staging, path)  # atomic: a half-made store is never used
    return path


# --- metrics.jsonl ----------------------------------------------------------------------------


def test_metrics_jsonl_lines_are_exactly_what_was_logged(tmp_path):
    import numpy as np

    out = tmp_path / "run"
    tracker = Tracker(out, make_config(out, "stage=kto"))
    tracker.log(1, {"loss": 0.69, "rewards/chosen": 0.01}, split="train", epoch=0.25)
    # Flushed at once: readable before the tracker is closed, as after a crash.
    assert [json.loads(l) for l in (out / METRICS_FILE).read_text().splitlines()] == [
        {"step": 1, "split": "train", "epoch": 0.25, "loss": 0.69, "rewards/chosen": 0.01}
    ]
    tracker.log(2, {"loss": np.float32(0.5), "epoch": 0.5, "grad_norm": float("nan")})
    tracker.log(2, {"loss": 0.71, "rewards/accuracy": 0.6}, split="eval")
    tracker.finish({"train_runtime": 1.5, "tokens_per_second": 100.0})

    lines = (out / METRICS_FILE).read_text().splitlines()
    assert [json.loads(l) for l in lines] == [
        {"step": 1, "split": "train", "epoch": 0.25, "loss": 0.69, "rewards/chosen": 0.01},
        {"step": 2, "split": "train", "epoch": 0.5, "loss": 0.5, "grad_norm": None},  # NaN -> null: strict JSON
        {"step": 2, "split": "eval", "loss": 0.71, "rewards/accuracy": 0.6},
    ]
    assert "NaN" not in lines[1]
    assert read_metrics(out) == [json.loads(l) for l in lines]
    assert json.loads((out / "train_results.json").read_text()) == {"train_runtime": 1.5, "tokens_per_second": 100.0}
    assert not list(out.glob("*.png"))  # plot_loss is off by default
    with pytest.raises(RuntimeError):
        tracker.log(3, {"loss": 0.1})


def test_resume_keeps_steps_up_to_resume_step_and_drops_the_interrupted_tail(tmp_path):
    out = tmp_path / "run"
    config = make_config(out, "stage=kto")
    first = Tracker(out, config)
    for step in range(1, 9):
        first.log(step, {"loss": 1.0 / step})
        if step % 4 == 0:
            first.log(step, {"loss": 2.0 / step}, split="eval")
    first.close(failed=True)  # the crash
    with open(out / METRICS_FILE, "a") as f:
        f.write('{"step": 9, "split": "tra')  # a line cut in half by the crash

    resumed = Tracker(out, config, resume_step=5)
    assert [(r["step"], r["split"]) for r in read_metrics(out)] == [
        (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"), (5, "train")
    ]
    resumed.log(6, {"loss": 0.01})
    resumed.finish({})
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6]
    assert records[-1] == {"step": 6, "split": "train", "loss": 0.01}
    assert records[3] == {"step": 4, "split": "train", "loss": 0.25}
    assert len((out / METRICS_FILE).read_text().splitlines()) == 7

    # A fresh run (no resume) in the same folder starts a new file.
    fresh = Tracker(out, config)
    fresh.log(1, {"loss": 3.0})
    fresh.close()
    assert read_metrics(out) == [{"step": 1, "split": "train", "loss": 3.0}]


# --- plots -----------------------------------------------------------------------------------


def test_kto_plots_are_three_readable_pngs(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker(out, make_config(out, "stage=kto", "plot_loss=true"), plots=KTO.PLOTS)
    for step in range(1, 31):
        tracker.log(step, kto_metrics(step), epoch=step / 30)
        if step % 10 == 0:
            tracker.log(step, {**kto_metrics(step), "rewards/accuracy": 0.7}, split="eval")
    plots = tracker.finish({"train_runtime": 1.0})

    names = ["training_loss.png", "training_rewards.png", "training_kl.png"]
    assert [p.name for p in plots] == names
    for name in names:
        path = out / name
        assert png_size(path) == (960, 540)
        assert path.stat().st_size > 15_000, f"{name} looks empty"
    assert not list(out.glob(".*tmp*"))  # written atomically, no leftovers


def test_sft_plot_is_only_the_loss(tmp_path):
    out = tmp_path / "run"
    tracker = Tracker(out, make_config(out, "stage=sft", "plot_loss=true"), plots=SFT.PLOTS)
    for step in range(1, 6):
        tracker.log(step, {"loss": 2.0 / step, "grad_norm": 1.0})
    tracker.log(5, {"loss": 0.5}, split="eval")
    plots = tracker.finish({})
    assert [p.name for p in plots] == ["training_loss.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["training_loss.png"]
    assert png_size(out / "training_loss.png") == (960, 540)


@pytest.mark.parametrize("n_points", [0, 1])
def test_plots_with_fewer_than_two_points_still_written(tmp_path, n_points):
    out = tmp_path / "run"
    tracker = Tracker(out, make_config(out, "stage=kto", "plot_loss=true"), plots=KTO.PLOTS)
    for step in range(1, n_points + 1):
        tracker.log(step, kto_metrics(step))
    plots = tracker.finish({})
    assert len(plots) == 3
    for path in plots:
        assert png_size(path) == (960, 540) and path.stat().st_size > 5_000


# --- MLflow ----------------------------------------------------------------------------------


def run_kto(out: Path, config, steps, resume_step=None, finish=True) -> Tracker:
    tracker = Tracker(out, config, resume_step=resume_step, plots=KTO.PLOTS)
    for step in steps:
        tracker.log(step, kto_metrics(step), epoch=step / 10)
        if step % 2 == 0:
            tracker.log(step, {"loss": 0.5 + step, "rewards/accuracy": 0.6}, split="eval")
    if finish:
        tracker.finish({"train_runtime": 2.0})
    return tracker


def use_store(empty_mlflow_db: Path, path: Path) -> None:
    """Start from an empty MLflow store: the schema only, so that tests skip its ~5 s creation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_mlflow_db, path)


def test_mlflow_local_store_under_output_dir_is_readable_back(tmp_path, no_mlflow_env, empty_mlflow_db):
    import mlflow
    from mlflow import MlflowClient

    out = tmp_path / "kto-run"
    use_store(empty_mlflow_db, out / "mlruns" / "mlflow.db")  # where the tracker must look, URI unset
    config = make_config(
        out,
        "stage=kto",
        "plot_loss=true",
        "report_to=mlflow",
        "lora_target=q_proj,v_proj",
        "resources_per_worker={GPU: 1, 'accelerator_type:L40S': 0.001}",
        "ray_init_kwargs={runtime_env: {env_vars: {HF_TOKEN: hf_secret, MLFLOW_EXPERIMENT_NAME: kto}}}",
        f"default_system={'x' * 7000}",
    )
    run_kto(out, config, range(1, 5))
    assert mlflow.active_run() is None  # nothing left active in this process

    assert (out / "mlruns" / "mlflow.db").is_file()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kto-run")  # default experiment: the output folder's name
    assert experiment is not None
    assert experiment.artifact_location.startswith((out / "mlruns" / "artifacts").as_uri())
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "kto-run"

    params = run.data.params
    assert params["stage"] == "kto" and params["learning_rate"] == "5e-05" and params["lora_rank"] == "8"
    assert params["lora_target"] == "q_proj,v_proj"
    assert params["resources_per_worker.accelerator_type_L40S"] == "0.001"  # ':' sanitised
    assert params["ray_init_kwargs.runtime_env.env_vars.HF_TOKEN"] == "***"  # secrets never leave the machine
    assert params["ray_init_kwargs.runtime_env.env_vars.MLFLOW_EXPERIMENT_NAME"] == "kto"
    assert params["default_system"] == "x" * 6000  # MLflow's limit on a param value
    assert len(params) == len(flat_params(config)) > 70

    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([kto_metrics(s)["loss"] for s in range(1, 5)], abs=1e-12)
    margins = client.get_metric_history(run.info.run_id, "train/rewards/margins")
    assert [(m.step, m.value) for m in margins] == [(s, pytest.approx(0.03 * s)) for s in range(1, 5)]
    eval_loss = client.get_metric_history(run.info.run_id, "eval/loss")
    assert [(m.step, m.value) for m in eval_loss] == [(2, 2.5), (4, 4.5)]
    epochs = client.get_metric_history(run.info.run_id, "train/epoch")
    assert [m.value for m in epochs] == pytest.approx([0.1, 0.2, 0.3, 0.4])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    expected = {"training_loss.png", "training_rewards.png", "training_kl.png", "train_results.json", "run_config.yaml"}
    assert expected <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "training_loss.png", str(tmp_path / "dl")))
    assert local.read_bytes() == (out / "training_loss.png").read_bytes()


def test_mlflow_experiment_name_from_env_and_resume_continues_the_run(
    tmp_path, no_mlflow_env, monkeypatch, empty_mlflow_db
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kto-llama3")
    out = tmp_path / "run"
    use_store(empty_mlflow_db, out / "mlruns" / "mlflow.db")
    config = make_config(out, "stage=kto", "report_to=mlflow")
    crashed = run_kto(out, config, range(1, 5), finish=False)
    crashed.close(failed=True)

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    assert client.get_experiment_by_name("run") is None
    experiment = client.get_experiment_by_name("kto-llama3")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"

    resume_config = make_config(out, "stage=kto", "report_to=mlflow", f"resume_from_checkpoint={out}/checkpoint-2")
    run_kto(out, resume_config, range(3, 6), resume_step=2)
    (resumed,) = client.search_runs([experiment.experiment_id])  # the same run, continued
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2, 3, 3, 4, 4, 5]  # MLflow keeps the interrupted tail's points (3, 4)
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2, 3, 4, 5]


def test_mlflow_tracking_uri_from_env(tmp_path, no_mlflow_env, monkeypatch, empty_mlflow_db):
    from mlflow import MlflowClient

    store = tmp_path / "server" / "mlflow.db"
    use_store(empty_mlflow_db, store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    out = tmp_path / "run"
    run_kto(out, make_config(out, "stage=sft", "report_to=mlflow", "plot_loss=true"), range(1, 3))
    assert not (out / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    assert run.data.params["stage"] == "sft"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert "training_loss.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_mlflow_names_are_sanitised():
    assert mlflow_name("train/rewards/chosen") == "train/rewards/chosen"
    assert mlflow_name("eval/acc@1:top") == "eval/acc_1_top"
    assert mlflow_name("/train//loss/") == "train/loss"
    assert mlflow_name("a/../b") == "a/b"


def test_flat_params_flatten_nested_values_and_mask_secrets(tmp_path):
    params = flat_params(
        make_config(tmp_path, "dataset=a,b", "ray_init_kwargs={runtime_env: {env_vars: {WANDB_API_KEY: k, N: 1}}}")
    )
    assert params["dataset"] == "a,b" and params["adapter_name_or_path"] == "None"
    assert params["ray_init_kwargs.runtime_env.env_vars.WANDB_API_KEY"] == "***"
    assert params["ray_init_kwargs.runtime_env.env_vars.N"] == "1"
    assert params["resources_per_worker"] == "{}"


# --- TensorBoard -----------------------------------------------------------------------------


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_event_files_are_readable_back(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    config = make_config(out, "stage=kto", "report_to=tensorboard")
    run_kto(out, config, range(1, 5))
    scalars = read_scalars(out / "runs")
    expected = {"train/loss", "train/rewards/chosen", "train/kl", "train/epoch", "eval/loss", "eval/rewards/accuracy"}
    assert expected <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    expected_loss = [kto_metrics(s)["loss"] for s in range(1, 5)]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(expected_loss, rel=1e-6)  # stored as float32
    assert scalars["eval/loss"] == [(2, 2.5), (4, 4.5)]

    # Resume from step 2: TensorBoard drops the interrupted tail (steps 3, 4) and shows the new values.
    run_kto(out, config, [3], resume_step=2)
    resumed = read_scalars(out / "runs")
    assert resumed["train/loss"] == [(s, pytest.approx(kto_metrics(s)["loss"], rel=1e-6)) for s in (1, 2, 3)]
    assert resumed["eval/loss"] == [(2, 2.5)]


# --- W&B and missing packages ----------------------------------------------------------------


def hide_module(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_wandb_missing_is_a_user_error_with_the_advice(tmp_path, monkeypatch):
    hide_module(monkeypatch, "wandb")
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        Tracker(out, make_config(out, "report_to=wandb"))
    message = str(err.value)
    assert "pip install wandb" in message and "wandb login" in message and "network" in message
    assert "mlflow" in message and "tensorboard" in message
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("tracker", ["mlflow", "tensorboard"])
def test_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, tracker):
    hide_module(monkeypatch, tracker)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf'pip install "prospect\[{tracker}\]"'):
        Tracker(out, make_config(out, f"report_to={tracker}"))


def test_wandb_when_installed_gets_the_same_scalars(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        summary: dict = {}

        def log(self, data, step=None):
            calls.append(("log", data, step))

        def finish(self, exit_code=0):
            calls.append(("finish", exit_code))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    fake.Image = lambda path: ("image", Path(path).name)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    out = tmp_path / "run"
    tracker = Tracker(out, make_config(out, "stage=sft", "report_to=wandb", "plot_loss=true"))
    tracker.log(1, {"loss": 1.5}, epoch=0.5)
    tracker.log(1, {"loss": 1.7}, split="eval")
    tracker.finish({"train_runtime": 3.0})
    assert calls[0][0] == "init" and calls[0][1]["config"]["stage"] == "sft" and calls[0][1]["name"] == "run"
    assert calls[1:] == [
        ("log", {"train/epoch": 0.5, "train/loss": 1.5}, 1),
        ("log", {"eval/loss": 1.7}, 1),
        ("log", {"plots/training_loss": ("image", "training_loss.png")}, None),
        ("finish", 0),
    ]
    assert FakeRun.summary == {"train_runtime": 3.0}


def test_a_failing_tracker_warns_once_and_the_run_goes_on(tmp_path, caplog):
    class BrokenWriter:  # stands for a tracker whose server went away mid-run
        closed = False

        def add_scalar(self, *args):
            raise ConnectionError("server gone")

        def close(self):
            BrokenWriter.closed = True

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with Tracker(out, make_config(out)) as tracker:
            tracker._tensorboard = BrokenWriter()
            tracker.log(1, {"loss": 1.0})
            tracker.log(2, {"loss": 0.5})
            raise KeyboardInterrupt  # the run stops: the context closes the trackers as failed
    assert [r["loss"] for r in read_metrics(out)] == [1.0, 0.5]
    warnings_logged = [r for r in caplog.records if "tensorboard logging failed" in r.getMessage()]
    assert len(warnings_logged) == 1 and "server gone" in warnings_logged[0].getMessage()
    assert BrokenWriter.closed and tracker._closed
