"""Ray Train's side of a prospect run: the run folder in shared storage (`RunFolder`) and what each
worker does (`train_loop_per_worker`): restore what a restarted worker group needs (the checkpoint
Ray hands back, its carried files, the KTO reference file), run `train(config)`, report each
checkpoint to Ray Train and, on rank 0, copy the outputs into the run folder. The driver, the
storage layout and the resume rule are in prospect/ray_launch.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path, PurePosixPath

from prospect.checkpoints import REFERENCE_FILE
from prospect.config import RunConfig
from prospect.errors import UserError

RUN_CONFIG_FILE = "run_config.yaml"
# Ray Train's record of the registered checkpoints of a run folder (ray/train/v2 CheckpointManager).
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Files a checkpoint carries besides what resume strictly needs, so that a worker restarted on another
# node (with an empty output_dir) continues metrics.jsonl and reuses the KTO reference log-probs.
CARRIED_FILES = ("metrics.jsonl", REFERENCE_FILE)


# --------------------------------------------------------------------------------------------------
# The run folder in shared storage (local path or URI), through pyarrow like Ray Train itself


class RunFolder:
    def __init__(self, storage_path: str, run_name: str):
        import pyarrow.fs

        self.uri = storage_path.rstrip("/") + "/" + run_name
        try:
            self.fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        except Exception as error:  # pyarrow's errors for unknown schemes, missing credentials, ...
            raise UserError(f"ray_storage_path: {storage_path}: {error}") from None
        self.path = str(PurePosixPath(root) / run_name)

    def _file(self, name: str) -> str:
        return str(PurePosixPath(self.path) / name)

    def exists(self, name: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self._file(name)).type != pyarrow.fs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._file(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str | None:
        return self.read_bytes(name).decode("utf-8") if self.exists(name) else None

    def read_yaml(self, name: str) -> dict | None:
        import yaml

        text = self.read_text(name)
        return yaml.safe_load(text) if text else None

    def write_text(self, name: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(self._file(name)) as f:
            f.write(text.encode("utf-8"))

    def latest_checkpoint(self) -> str | None:
        """The newest checkpoint Ray registered in this run folder, or None."""
        text = self.read_text(RAY_SNAPSHOT_FILE)
        try:
            latest = json.loads(text)["latest_checkpoint_result"] if text else None
        except (ValueError, KeyError, TypeError):
            return "a checkpoint"  # Ray's format changed: Ray still resumes, we just cannot name it
        return latest["checkpoint_dir_name"] if latest else None

    def clear(self) -> None:
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    def upload(self, local: Path, name: str) -> None:
        """Copy a local file or folder into the run folder."""
        import pyarrow.fs

        target = self._file(name)
        if local.is_dir():
            self.fs.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(str(local), target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=self.fs)
        else:
            with open(local, "rb") as source, self.fs.open_output_stream(target) as destination:
                shutil.copyfileobj(source, destination, length=16 * 2**20)


# --------------------------------------------------------------------------------------------------
# Each worker


def train_loop_per_worker(loop_config: dict) -> dict:
    """What every Ray Train worker runs: train(config) from Ray's latest checkpoint, if any."""
    import ray.train
    import torch

    from prospect.train import train

    config: RunConfig = loop_config["config"]
    rank = ray.train.get_context().get_world_rank()
    # Ray Train starts each worker in a session folder; back in the driver's folder (where it exists:
    # same node or shared filesystem) relative paths in the YAML (dataset_dir: data, a model folder,
    # a DeepSpeed json) mean what they mean in a plain run.
    if os.path.isdir(loop_config.get("cwd", "")):
        os.chdir(loop_config["cwd"])
    # Ray sets OMP_NUM_THREADS to the worker's CPUs (1 unless resources_per_worker says more); torch
    # must follow it, or a few workers oversubscribe the cores and each step gets many times slower.
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
    if not torch.cuda.is_available() and not config.deepspeed:
        # Accelerate joins the gloo group Ray Train set up only when told it runs on CPU; without
        # this every worker would train alone as a world of one. (Under DeepSpeed, which that setting
        # would turn off, train() joins the group itself.)
        os.environ["ACCELERATE_USE_CPU"] = "true"
    _progress_as_lines(show=rank == 0)
    if rank != 0:
        _quiet()
    with _resume_point(config, ray.train.get_checkpoint()) as config:
        storage = RunFolder(config.ray_storage_path, config.ray_run_name)
        try:
            results = train(config, on_checkpoint=report_checkpoint,
                            on_reference_saved=lambda path: storage.upload(path, REFERENCE_FILE))
        except UserError as error:  # the driver prints the message; Ray's log needs no deep traceback
            raise UserError(str(error)) from None
    if rank == 0:
        _copy_outputs(config)
    return results  # Ray hands rank 0's to the driver as Result.return_value


def _quiet() -> None:
    """Ranks other than 0 keep errors, but not the warnings and progress bars every rank would repeat."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _progress_as_lines(show: bool) -> None:
    """Ray forwards a worker's output line by line, so a tqdm bar redrawn with carriage returns would
    show up only when it ends. On rank 0 a bar becomes a line every 30 seconds, and its last state;
    other ranks show none (one progress bar per run)."""
    import sys

    if not isinstance(sys.stderr, _ProgressLines):
        sys.stderr = _ProgressLines(sys.stderr, every_s=30.0 if show else float("inf"), show_last=show)


class _ProgressLines:
    """A text stream for progress bars in line-based logs: a redraw ("\\r" + bar) is held back and
    written as a line at most every `every_s` seconds, and when the bar ends; other text passes."""

    def __init__(self, stream, every_s: float, show_last: bool = True):
        self._stream, self._every_s, self._show_last = stream, every_s, show_last
        self._pending: str | None = None
        self._last = float("-inf")

    def write(self, text: str) -> int:
        import time

        if not text:
            return 0
        if text.startswith("\r") and "\n" not in text:  # a redraw; only spaces when tqdm clears the bar
            self._pending = text.strip() or None
            if self._pending and time.monotonic() - self._last >= self._every_s:
                self._flush_pending()
            return len(text)
        if self._pending and not text.strip():  # the newline tqdm writes when a bar ends
            if self._show_last:
                self._flush_pending()
            self._pending = None
        lines = [line for line in text.replace("\r", "\n").split("\n") if line.strip()]
        if lines:
            self._stream.write("\n".join(lines) + "\n")
        return len(text)

    def _flush_pending(self) -> None:
        import time

        self._stream.write(self._pending + "\n")
        self._pending, self._last = None, time.monotonic()

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _resume_point(config: RunConfig, checkpoint):
    """The config to train with: resuming from Ray's latest checkpoint when there is one (after a
    worker-group restart, or a re-run of a killed job), else from resume_from_checkpoint if set."""
    from ray.train import Checkpoint

    if checkpoint is None and config.resume_from_checkpoint and "://" in config.resume_from_checkpoint:
        checkpoint = Checkpoint(config.resume_from_checkpoint)  # a checkpoint in storage, by URI
    if checkpoint is None:
        # Before the first checkpoint, a restarted worker group continues the KTO reference pass from the
        # run folder's copy of the reference file (train() reuses what matches its inputs).
        _restore_reference(config)
        yield config
        return
    # A local storage path is used in place; a URI is downloaded once per node, removed afterwards.
    with checkpoint.as_directory() as folder:
        _restore_carried_files(Path(folder), Path(config.output_dir))
        yield dataclasses.replace(config, resume_from_checkpoint=folder)


def _restore_carried_files(checkpoint: Path, output_dir: Path) -> None:
    """Put the checkpoint's metrics.jsonl and reference log-probs into output_dir, so a worker that
    restarted on another node continues them (train() keeps metrics.jsonl lines up to the step)."""
    import ray.train

    output_dir.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        source = checkpoint / name
        if not source.is_file() or (name == "metrics.jsonl" and ray.train.get_context().get_world_rank() != 0):
            continue
        partial = output_dir / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(source, partial)
        os.replace(partial, output_dir / name)  # atomic: ranks sharing the folder never read half a file


def _restore_reference(config: RunConfig) -> None:
    """Copy the run folder's KTO reference file into rank 0's output_dir (rank 0 reads it and
    broadcasts what it holds)."""
    import ray.train

    storage = RunFolder(config.ray_storage_path, config.ray_run_name)
    if ray.train.get_context().get_world_rank() != 0 or not storage.exists(REFERENCE_FILE):
        return
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / f".{REFERENCE_FILE}.{os.getpid()}.tmp"
    partial.write_bytes(storage.read_bytes(REFERENCE_FILE))
    os.replace(partial, output_dir / REFERENCE_FILE)


def report_checkpoint(step: int, folder: Path, is_main: bool) -> None:
    """train()'s on_checkpoint hook: hand checkpoint-<step> to Ray Train (on every rank; a report is
    a barrier). Ray copies it to <run folder>/checkpoint-<step>, registers it once every rank's copy
    is done, and deletes the local folder."""
    import ray.train

    if is_main:
        for name in CARRIED_FILES:
            if (folder.parent / name).is_file():
                shutil.copyfile(folder.parent / name, folder / name)
        local = folder
    else:
        # Where output_dir is shared (one node, or a shared filesystem) rank 0's folder already holds
        # this rank's RNG state; on a node-local output_dir the rank reports its own piece, which Ray
        # merges into the same checkpoint folder.
        from prospect.checkpoints import temporary_folder

        own = temporary_folder(str(folder.parent), step)
        local = own if own.is_dir() else None
    ray.train.report(
        {"step": step},
        checkpoint=ray.train.Checkpoint.from_directory(str(local)) if local is not None else None,
        checkpoint_dir_name=f"checkpoint-{step}",
        delete_local_checkpoint_after_upload=True,
    )


def _copy_outputs(config: RunConfig) -> None:
    """Rank 0's final outputs (adapter, tokenizer, metrics, plots, trackers' folders) into the run
    folder; checkpoints are there already."""
    storage = RunFolder(config.ray_storage_path, config.ray_run_name)
    for entry in sorted(Path(config.output_dir).iterdir()):
        if entry.name.startswith(".") or entry.name.startswith("checkpoint-"):
            continue
        storage.upload(entry, entry.name)
