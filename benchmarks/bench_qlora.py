"""QLoRA (quantization_bit: 4) against LoRA on a float32 base: peak memory and step time, same run otherwise.

    python benchmarks/bench_qlora.py                  # the embedded SmolLM2-135M-Instruct, on this machine
    python benchmarks/bench_qlora.py --steps 4 --model <folder>

Each run is `prospect train examples/kto_lora.yaml` in a fresh process (KTO, LoRA r8 on every linear
layer, batch 8, the bundled signoff_kto data in the same order) for `--steps` optimizer steps, without
evaluation. Peak memory is the process's peak resident set on CPU (train_results.json's
peak_memory_bytes; torch.cuda.max_memory_allocated on a GPU); the step time is the optimizer steps'
wall time over their number (the reference pass and loading are left out). "Base weights" is the
loaded base model's `get_memory_footprint()` (parameters and buffers), loaded once more after the runs. The runs alternate
(LoRA, QLoRA, LoRA, QLoRA, ...) `--repeats` times; the table shows the median of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"LoRA, float32 base": [], "QLoRA, 4-bit nf4 base": ["quantization_bit=4"]}


def one_run(args, extra: list[str], output_dir: Path) -> dict:
    command = [sys.executable, "-m", "prospect", "train", str(REPO / "examples" / "kto_lora.yaml"),
               f"model_name_or_path={args.model}", f"max_steps={args.steps}", "eval_dataset=[]", "eval_steps=null",
               f"output_dir={output_dir}", "save_steps=1000000", "logging_steps=1", "plot_loss=false",
               f"dataset_dir={REPO / 'examples' / 'data'}", *extra]
    subprocess.run(command, check=True, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads((output_dir / "train_results.json").read_text())
    return {"peak_gib": results["peak_memory_bytes"] / 2**30,
            "step_seconds": results["num_tokens"] / results["tokens_per_second"] / results["num_steps"]}


def base_weights_gib(model: str, quantization_bit: int | None) -> float:
    import torch

    from prospect.config import build_config
    from prospect.model import load_model, quantization_config

    config = build_config({"model_name_or_path": model, "quantization_bit": quantization_bit})
    quantization = quantization_config(config, compute_dtype=torch.float32)
    loaded = load_model(model, quantization=quantization, device=torch.device("cpu"))
    return loaded.get_memory_footprint() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    measured: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="prospect-bench-qlora-") as workdir:
        for repeat in range(args.repeats):
            for number, (name, extra) in enumerate(RUNS.items()):
                measured[name].append(one_run(args, extra, Path(workdir) / f"{repeat}-{number}"))
                print(f"{name}, repeat {repeat + 1}: {measured[name][-1]}", flush=True)
    print(f"\n{args.model}, KTO, batch 8, {args.steps} steps, medians of {args.repeats} runs each\n")
    print("| run | base weights GiB | peak memory GiB | step s |\n|---|---|---|---|")
    medians = {}
    for (name, runs), bits in zip(measured.items(), (None, 4)):
        medians[name] = {key: statistics.median(run[key] for run in runs) for key in ("peak_gib", "step_seconds")}
        medians[name]["weights_gib"] = base_weights_gib(args.model, bits)
        print(f"| {name} | {medians[name]['weights_gib']:.3f} | {medians[name]['peak_gib']:.2f} | "
              f"{medians[name]['step_seconds']:.2f} |")
    lora, qlora = medians.values()
    print(f"QLoRA / LoRA: base weights {qlora['weights_gib'] / lora['weights_gib']:.2f}×, peak memory "
          f"{qlora['peak_gib'] / lora['peak_gib']:.2f}×, step time {qlora['step_seconds'] / lora['step_seconds']:.2f}×")


if __name__ == "__main__":
    main()
