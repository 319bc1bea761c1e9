"""What a run records: `metrics.jsonl`, the loss/reward/KL plots, and the optional trackers.

The training loop makes one `Tracker` on rank 0 and calls `log` every `logging_steps` (and after
each evaluation) and `finish` at the end:

    tracker = Tracker(output_dir, config, resume_step=None)
    tracker.log(step, {"loss": 0.69, "rewards/chosen": 0.01}, split="train", epoch=0.25)
    tracker.finish(train_results)   # plots (plot_loss), artifacts, trackers closed

`metrics.jsonl` is the record of truth: one JSON object per `log` call,
`{"step": 10, "split": "train", "epoch": 0.25, "loss": 0.69, ...}`, flushed line by line so a crash
loses nothing. Non-finite values are written as `null` (strict JSON). On resume (`resume_step=N`)
the lines with step > N, the interrupted tail, are dropped, so the file reads as one clean run.

`report_to` (config) adds trackers; each library is imported only when asked for:

- `mlflow`: params (the resolved config, flattened to `key.sub` = value, values cut to 6000
  characters, secrets in env vars masked), metrics and, at the end, the plots,
  `train_results.json` and `run_config.yaml` as artifacts. Metric names are `<split>/<metric>`,
  e.g. `train/loss`, `eval/rewards/accuracy` (MLflow accepts `/`); any character MLflow rejects
  (outside letters, digits, `_ - . /` and space) becomes `_`. Without `MLFLOW_TRACKING_URI` the
  store is local, `sqlite:///<output_dir>/mlruns/mlflow.db` with artifacts in
  `<output_dir>/mlruns/artifacts`: MLflow 3.17 refuses the old `file:` store unless
  `MLFLOW_ALLOW_FILE_STORE=true`, and SQLite is its recommended local backend. Browse it with
  `mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns/mlflow.db`. The experiment is
  `$MLFLOW_EXPERIMENT_NAME`, else the output folder's name. A resumed run continues the MLflow
  run of the same output folder (found by its `prospect.output_dir` tag); MLflow cannot delete
  metric points, so the interrupted tail's points stay in its history next to the new ones.
  Only `MlflowClient` is used: no fluent "active run" is ever left behind.
- `tensorboard`: event files in `<output_dir>/runs`, scalars tagged `train/loss`, `eval/loss`, ...;
  a resumed run purges events after step N.
- `wandb`: used when installed (it needs network access and `wandb login`); otherwise a
  `UserError` says how to install it or to use mlflow / tensorboard, which work offline.

A tracker that fails while logging a step warns once and the run goes on: `metrics.jsonl` still
has every value.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prospect.errors import UserError

# (file name, title, y label, the metrics drawn); each objective lists its own.
Plot = tuple[str, str, str, tuple[str, ...]]
LOSS_PLOT: Plot = ("training_loss.png", "Training loss", "loss", ("loss",))

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRAIN_RESULTS_FILE = "train_results.json"
MLFLOW_PARAM_MAX_CHARS = 6000  # MLflow's limit on a param value
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)


class Tracker:
    """metrics.jsonl + plots + the `report_to` trackers of one run (rank 0 only)."""

    def __init__(self, output_dir: str | os.PathLike, config: Any, resume_step: int | None = None,
                 plots: Sequence[Plot] = (LOSS_PLOT,)):
        self.output_dir = Path(output_dir)
        self.config = config
        self.plots = plots  # the objective's (prospect/objectives): what finish() draws when plot_loss
        self.report_to = [t for t in config.report_to if t != "none"]
        self._mlflow = self._tensorboard = self._wandb = None
        self._warned: set[str] = set()
        self._closed = False
        _check_installed(self.report_to)  # before touching any file
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = _open_metrics(self.output_dir / METRICS_FILE, resume_step)
        try:
            if "mlflow" in self.report_to:
                self._mlflow = _start_mlflow(self.output_dir, config, resume_step)
            if "tensorboard" in self.report_to:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tensorboard = SummaryWriter(str(self.output_dir / "runs"), purge_step=purge)
            if "wandb" in self.report_to:
                import wandb

                self._wandb = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", "prospect"),
                    name=config.ray_run_name or self.output_dir.resolve().name,
                    dir=str(self.output_dir),
                    config=flat_params(config),
                )
        except BaseException:
            self.close(failed=True)
            raise

    def log(self, step: int, metrics: dict[str, Any], split: str = "train", epoch: float | None = None) -> dict:
        """Append one line to metrics.jsonl and send the numbers to the trackers; returns the line."""
        if self._closed:
            raise RuntimeError("Tracker.log after finish/close")
        metrics = dict(metrics)
        if epoch is None:
            epoch = metrics.pop("epoch", None)
        metrics.pop("epoch", None)
        if "step" in metrics or "split" in metrics:
            raise ValueError("metric names 'step' and 'split' are reserved")
        record: dict[str, Any] = {"step": int(step), "split": split}
        if epoch is not None:
            record["epoch"] = float(_plain(epoch))
        record.update({key: _plain(value) for key, value in metrics.items()})
        self._metrics.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self._metrics.flush()

        scalars = {
            f"{split}/{key}": float(value)
            for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if self._mlflow is not None:
            client, run_id = self._mlflow
            self._safely("mlflow", _mlflow_log, client, run_id, scalars, int(step))
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._safely("tensorboard", self._tensorboard.add_scalar, tag, value, int(step))
        if self._wandb is not None:
            self._safely("wandb", self._wandb.log, scalars, step=int(step))
        return record

    def finish(self, train_results: dict | None = None) -> list[Path]:
        """Write train_results.json and the plots (when plot_loss), upload them, close the trackers.

        Returns the plot paths written.
        """
        try:
            self._metrics.flush()
            plots = plot_metrics(self.output_dir, self.plots) if self.config.plot_loss else []
            files = list(plots)
            if train_results is not None:
                files.append(self.output_dir / TRAIN_RESULTS_FILE)
                _write_atomic(files[-1], json.dumps(train_results, indent=1, default=str) + "\n")
            if self._mlflow is not None:
                client, run_id = self._mlflow
                for path in files:
                    self._safely("mlflow", client.log_artifact, run_id, str(path))
            if self._wandb is not None:
                import wandb

                self._wandb.summary.update(train_results or {})
                if plots:
                    self._safely("wandb", self._wandb.log, {f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
        except BaseException:
            self.close(failed=True)
            raise
        self.close()
        return plots

    def close(self, failed: bool = False) -> None:
        """Close the file and the trackers (idempotent); `failed` marks the tracker runs as failed.

        Call it (or use the Tracker as a context manager) when training stops on an error, so the
        MLflow run is marked FAILED rather than left RUNNING.
        """
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_metrics", None) is not None:
            self._metrics.close()
        if self._mlflow is not None:
            client, run_id = self._mlflow
            self._safely("mlflow", client.set_terminated, run_id, "FAILED" if failed else "FINISHED")
        if self._tensorboard is not None:
            self._safely("tensorboard", self._tensorboard.close)
        if self._wandb is not None:
            self._safely("wandb", self._wandb.finish, exit_code=1 if failed else 0)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _safely(self, name: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as err:  # a tracker hiccup must not kill a long run; metrics.jsonl has it all
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("%s logging failed (%s); training goes on, metrics.jsonl keeps every value", name, err)


# --- metrics.jsonl ---------------------------------------------------------------------------


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The lines of `<output_dir>/metrics.jsonl` ([] if absent); a half-written last line is skipped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _open_metrics(path: Path, resume_step: int | None):
    """A fresh file, or on resume the lines with step <= resume_step, opened for appending."""
    if resume_step is None:
        return open(path, "w", encoding="utf-8")
    kept = [r for r in read_metrics(path.parent) if r.get("step", 0) <= resume_step]
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return open(path, "a", encoding="utf-8")


def _plain(value: Any) -> Any:
    """0-d tensors and numpy scalars as Python numbers."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    return value


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- plots -----------------------------------------------------------------------------------

def plot_metrics(output_dir: str | os.PathLike, plots: Sequence[Plot]) -> list[Path]:
    """Write each plot (an objective's PLOTS: file name, title, y label, metric keys) from metrics.jsonl."""
    output_dir = Path(output_dir)
    records = read_metrics(output_dir)
    run = output_dir.resolve().name
    return [_plot(output_dir / name, f"{title} · {run}", ylabel, records, list(keys))
            for name, title, ylabel, keys in plots]


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average, smoothing more when there are more points (as LLaMA-Factory)."""
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def _plot(path: Path, title: str, ylabel: str, records: list[dict], keys: list[str]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    single = len(keys) == 1
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    anything = smoothed = False
    for i, key in enumerate(keys):
        color = colors[i % len(colors)]
        name = key.split("/")[-1] if not single else key
        steps, values = _series(records, "train", key)
        if steps:
            anything = True
            smooth = len(steps) >= 2
            raw_label = f"train {name}" if not smooth else (f"train {name} (raw)" if single else None)
            ax.plot(steps, values, color=color, alpha=0.35 if smooth else 1.0, linewidth=1, marker="o",
                    markersize=3 if smooth else 6, label=raw_label)
            if smooth:
                smoothed = True
                ax.plot(steps, _smooth(values), color=color, linewidth=2, label=f"train {name} (smoothed)")
        steps, values = _series(records, "eval", key)
        if steps:
            anything = True
            eval_color = "tab:orange" if single else color
            ax.plot(steps, values, color=eval_color, linestyle="--", marker="s", markersize=6, label=f"eval {name}")
    if not single and smoothed:
        ax.plot([], [], color="gray", alpha=0.35, marker="o", markersize=3, label="faint: raw train values")
    if not anything:
        ax.text(0.5, 0.5, f"no {', '.join(keys)} logged yet", transform=ax.transAxes, ha="center", va="center")
    if not single:
        ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left, right = ax.get_xlim()
    if right - left < 2:  # a single step: keep whole-number ticks around it
        middle = round((left + right) / 2)
        ax.set_xlim(middle - 1, middle + 1)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# --- trackers --------------------------------------------------------------------------------


def _check_installed(report_to: list[str]) -> None:
    for tracker in report_to:
        module = {"mlflow": "mlflow", "tensorboard": "tensorboard", "wandb": "wandb"}.get(tracker)
        if module is None or importlib.util.find_spec(module) is not None:
            continue
        if tracker == "wandb":
            raise UserError(
                "report_to: wandb needs the wandb package: `pip install wandb`, and it needs network access "
                "and `wandb login`. Or use report_to: mlflow or tensorboard, which work offline "
                '(`pip install "prospect[mlflow]"` / `"prospect[tensorboard]"`).'
            )
        raise UserError(
            f'report_to: {tracker} needs the {module} package: `pip install "prospect[{tracker}]"` '
            "(or remove it from report_to)."
        )


def flat_params(config: Any) -> dict[str, str]:
    """The resolved config as flat `key.sub` -> string, for tracker params (secrets masked)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            out[prefix] = ",".join(map(str, value))
        elif _SECRET_KEY.search(prefix.rsplit(".", 1)[-1]) and value not in (None, ""):
            out[prefix] = "***"
        else:
            out[prefix] = str(value)

    for key, value in config.to_dict().items():
        walk(key, value)
    return out


def mlflow_name(name: str) -> str:
    """A metric/param name MLflow accepts: letters, digits, `_ - . /` and space; no empty path parts."""
    name = re.sub(r"[^\w./ -]", "_", name)
    return "/".join(part for part in name.split("/") if part not in ("", ".", "..")) or "_"


def _start_mlflow(output_dir: Path, config: Any, resume_step: int | None):
    """(client, run_id) of a new MLflow run, or on resume the run of the same output folder."""
    with warnings.catch_warnings():
        # mlflow's SQL store triggers a SQLAlchemy deprecation warning of its own at start-up.
        warnings.filterwarnings("ignore", message=".*noload.*")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        local = not os.environ.get("MLFLOW_TRACKING_URI")
        store = output_dir.resolve() / "mlruns"
        if local:
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
        else:
            uri = os.environ["MLFLOW_TRACKING_URI"]
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or output_dir.resolve().name or "prospect"
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(experiment_name)
        except Exception as err:
            raise UserError(
                f"MLflow tracking store {uri} cannot be used ({err}). Check MLFLOW_TRACKING_URI, or unset it "
                "to keep runs in a local store under output_dir."
            ) from err
    if experiment is None:
        artifacts = (store / "artifacts").as_uri() if local else None
        experiment_id = client.create_experiment(experiment_name, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)

    folder = str(output_dir.resolve())
    if resume_step is not None and "'" not in folder:
        previous = client.search_runs(
            [experiment_id], filter_string=f"tags.`prospect.output_dir` = '{folder}'", max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if previous:
            run_id = previous[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return client, run_id  # params were logged by the first attempt (and may not change)

    run = client.create_run(
        experiment_id,
        run_name=config.ray_run_name or output_dir.resolve().name,
        tags={"prospect.output_dir": folder, "prospect.stage": config.stage},
    )
    run_id = run.info.run_id
    params = [Param(mlflow_name(k)[:250], v[:MLFLOW_PARAM_MAX_CHARS]) for k, v in flat_params(config).items()]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, config.to_yaml(), "run_config.yaml")
    return client, run_id


def _mlflow_log(client, run_id: str, scalars: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(mlflow_name(k), v, now, step) for k, v in scalars.items()])
