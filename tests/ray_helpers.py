"""Test-only code that runs inside the Ray workers of tests/test_ray.py.

`train_loop` wraps prospect's `train_loop_per_worker` (passed as `launch_on_ray(config,
train_loop=...)`). Its instructions come from environment variables that the test puts in the YAML's
`ray_init_kwargs.runtime_env.env_vars`, so reading them at all shows those variables reach every
worker. Nothing here is in the package: prospect has no test hook beyond accepting another loop.

    PROSPECT_TEST_RECORD_DIR   each worker writes <dir>/<pid>.json: rank, node id, attempt, the
                               PROSPECT_TEST_* variables it sees
    PROSPECT_TEST_KILL         "<rank>:<step>": in the first attempt, that rank SIGKILLs its own
                               process right after Ray registered checkpoint-<step>, mid-run
    PROSPECT_TEST_KILL_REFERENCE  "<n>": the KTO reference file is saved after every batch, and rank 0
                               deletes its local copy and SIGKILLs itself once its n-th save reached
                               the run folder (a node lost with its disk), in the first attempt only
                               (a marker file in PROSPECT_TEST_RECORD_DIR says so)

The test sends cloudpickle this module by value (tests/ is not importable in the workers).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


def train_loop(loop_config: dict) -> dict:
    import ray
    import ray.train

    from prospect.ray_worker import train_loop_per_worker

    rank = ray.train.get_context().get_world_rank()
    first_attempt = ray.train.get_checkpoint() is None
    record_dir = os.environ.get("PROSPECT_TEST_RECORD_DIR")
    if record_dir:
        seen = {name: value for name, value in os.environ.items()
                if name.startswith("PROSPECT_TEST_") or name == "THP_MEM_ALLOC_ENABLE"}
        record = {"rank": rank, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                  "first_attempt": first_attempt, "env": seen}
        Path(record_dir, f"{os.getpid()}.json").write_text(json.dumps(record))

    kill_reference = os.environ.get("PROSPECT_TEST_KILL_REFERENCE")
    if kill_reference:
        _kill_after_reference_saves(int(kill_reference), rank, Path(record_dir) / "reference-killed")
    kill = os.environ.get("PROSPECT_TEST_KILL")
    if kill and first_attempt:
        kill_rank, kill_step = (int(part) for part in kill.split(":"))
        if rank == kill_rank:
            _kill_after_checkpoint(kill_step)
    return train_loop_per_worker(loop_config)


def _kill_after_checkpoint(step: int) -> None:
    """Wrap ray.train.report (prospect reports each checkpoint through it) so that this process
    SIGKILLs itself once checkpoint-<step> is registered: a worker lost between two checkpoints."""
    import ray.train

    report = ray.train.report

    def report_then_die(metrics, checkpoint=None, **kwargs):
        report(metrics, checkpoint=checkpoint, **kwargs)
        if metrics.get("step") == step:
            # Blocks until the controller has registered every report so far, checkpoint-<step> included.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            print(f"test: SIGKILL to this worker (pid {os.getpid()}) after checkpoint-{step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    ray.train.report = report_then_die


def _kill_after_reference_saves(saves: int, rank: int, marker: Path) -> None:
    """Save the reference file after every batch; in the first attempt rank 0 dies after `saves` of
    them reached the run folder, taking its local copy with it: a node lost during the reference pass,
    before any checkpoint (only the run folder's copy can continue the pass)."""
    import prospect.ray_worker
    import prospect.reference

    prospect.reference.REFERENCE_SAVE_EVERY = 1
    if rank != 0 or marker.exists():
        return
    upload, done = prospect.ray_worker.RunFolder.upload, []

    def upload_then_die(self, local, name):
        upload(self, local, name)
        if name == prospect.ray_worker.REFERENCE_FILE:
            done.append(1)
            if len(done) == saves:
                marker.write_text("killed")
                os.remove(local)
                print(f"test: SIGKILL to this worker (pid {os.getpid()}) after reference save {saves}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    prospect.ray_worker.RunFolder.upload = upload_then_die
