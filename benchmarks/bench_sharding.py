"""FSDP2 (fsdp: full_shard) and DeepSpeed ZeRO against DDP on 2 processes of this machine: peak memory per
process, step time, and how far apart the runs end.

    python benchmarks/bench_sharding.py                    # the embedded SmolLM2-135M-Instruct, full fine-tuning
    python benchmarks/bench_sharding.py --finetuning lora --steps 4

Each run is `torchrun --nproc_per_node 2 -m prospect train` of the same SFT job (the bundled signoff_sft
data, batch 1 per process, cutoff 256, AdamW, fp32, no evaluation), with DDP, with `fsdp: full_shard` and
with `deepspeed: examples/deepspeed/ds_z2_config.json` and ds_z3_config.json, alternating `--repeats` times. Peak memory is each process's peak resident set
(train_results.json's peak_memory_bytes_per_process, from getrusage); step time is the optimizer
steps' wall time over their number. The loss and weight differences compare the two runs' logged
losses and saved weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = REPO / "examples" / "deepspeed"


RUNS = {"DDP": "fsdp=null", "FSDP2 full_shard": "fsdp=full_shard",
        "DeepSpeed ZeRO-2": f"deepspeed={DEEPSPEED / 'ds_z2_config.json'}",
        "DeepSpeed ZeRO-3": f"deepspeed={DEEPSPEED / 'ds_z3_config.json'}"}


def one_run(args, setting: str, output_dir: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
               "-m", "prospect", "train", str(REPO / "examples" / "sft_lora.yaml"),
               f"model_name_or_path={args.model}", f"finetuning_type={args.finetuning}", f"max_steps={args.steps}",
               "per_device_train_batch_size=1", "gradient_accumulation_steps=1", "cutoff_len=256",
               "eval_dataset=[]", "val_size=0", "eval_strategy=no", f"output_dir={output_dir}", "save_steps=1000000",
               "logging_steps=1", "plot_loss=false", "learning_rate=1e-5", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.return_freed_memory:  # glibc keeps freed blocks by default, so the peak RSS counts transient buffers
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(command, cwd=str(REPO), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output_dir / "train_results.json").read_text())
    losses = [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"peak_gib": [b / 2**30 for b in results["peak_memory_bytes_per_process"]],
            "step_seconds": results["num_tokens"] / results["tokens_per_second"] / results["num_steps"],
            "parameters_per_process": results["parameters_per_process"], "losses": losses}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(folder / name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--finetuning", choices=("full", "lora"), default="full")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="glibc hands freed memory back to the system (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)")
    args = parser.parse_args()
    measured: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="prospect-bench-sharding-") as workdir:
        for repeat in range(args.repeats):
            for number, (name, setting) in enumerate(RUNS.items()):
                output = Path(workdir) / f"run-{repeat}-{number}"
                measured[name].append(one_run(args, setting, output))
                print(f"repeat {repeat + 1}: {name}: {measured[name][-1]}", flush=True)
        first = [weights(Path(workdir) / f"run-0-{number}") for number in range(len(RUNS))]
        weight_differences = [max(float((first[0][k] - other[k]).abs().max()) for k in first[0]) for other in first[1:]]
    ddp, *sharded = (measured[name] for name in RUNS)
    names = list(RUNS)[1:]
    print(f"\n{args.model}, {args.finetuning} fine-tuning, 2 processes, {args.steps} steps; medians of {args.repeats}"
          + ("; freed memory handed back" if args.return_freed_memory else "") + "\n")
    print("| measure | DDP | " + " | ".join(f"{name} | ratio" for name in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    for label, pick in (("peak RSS, process 0 (GiB)", lambda r: r["peak_gib"][0]),
                        ("peak RSS, process 1 (GiB)", lambda r: r["peak_gib"][1]),
                        ("weights held per process", lambda r: r["parameters_per_process"]),
                        ("step time (s)", lambda r: r["step_seconds"])):
        x = statistics.median(map(pick, ddp))
        cells = [statistics.median(map(pick, runs_of)) for runs_of in sharded]
        print(f"| {label} | {x:.4g} | " + " | ".join(f"{y:.4g} | {y / x:.2f}×" for y in cells) + " |")
    for name, runs_of, weight_difference in zip(names, sharded, weight_differences):
        loss_difference = max(abs(x - y) for x, y in zip(ddp[0]["losses"], runs_of[0]["losses"]))
        print(f"{name}: max |loss difference| from DDP {loss_difference:.2e}, max |weight difference| after "
              f"{args.steps} steps {weight_difference:.2e}")


if __name__ == "__main__":
    main()
