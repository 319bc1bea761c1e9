"""KTO on conversations rated at several turns: one forward pass per conversation against one per rated turn.

    python benchmarks/bench_rated_turns.py                 # the embedded SmolLM2-135M-Instruct, on this machine
    python benchmarks/bench_rated_turns.py --conversations 16 --model <folder>

The data: the multi-turn records of ../shared/data/kto_en_demo.json (3 to 6 assistant turns) that fit
cutoff_len whole, every assistant turn rated (the record's label on its last turn, alternating labels
before it). Two runs of the same KTO job (LoRA r8, batch 8, one epoch, no evaluation), each in a
fresh process, alternating `--repeats` times:

- `rated turns`: the records as they are, with a `"label"` on each rated turn: the turns of one
  conversation share its forward pass;
- `separate records`: each rated turn written as its own record (the conversation up to it), the
  layout every other tool reads, with folding off, so each turn is a sequence of its own.

Both train on the same examples; each step holds the same ones (a conversation's turns stay together
in the data order, and one step is 8 examples). Counted in the run by wrapping
`prospect.forward.sequence_logps`: the packed sequences and tokens of every forward (reference pass,
KL passes, training), and the wall time of the reference pass and of the optimizer steps.
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
SHARED_DATA = REPO.parent / "shared" / "data"
ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
RUNS = ("rated turns", "separate records")


def write_data(folder: Path, count: int, max_chars: int) -> int:
    """The two datasets; returns the number of rated turns."""
    records = json.loads((SHARED_DATA / "kto_en_demo.json").read_text())
    chosen = [r for r in records if sum(m["role"] == "assistant" for m in r["messages"]) >= 3
              and sum(len(m["content"]) for m in r["messages"]) <= max_chars][:count]
    assert len(chosen) == count, f"only {len(chosen)} multi-turn records fit {max_chars} characters"
    turns, separate = [], []
    for record in chosen:
        messages = [dict(m) for m in record["messages"]]
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k, i in enumerate(assistant[:-1]):
            messages[i]["label"] = k % 2 == 0
        turns.append({"messages": messages, "label": record["label"]})
        for i in assistant:
            label = messages[i].get("label", record["label"])
            separate.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages[: i + 1]],
                             "label": label})
    for name, rows in (("turns", turns), ("separate", separate)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / name / "dataset_info.json").write_text(json.dumps({"rated": {"file_name": "data.jsonl", **ENTRY}}))
    return len(separate)


def one_run(name: str, data: Path, output_dir: Path, model: str) -> dict:
    """Runs in its own process (`--one`): train, counting every forward pass."""
    import time

    import prospect.data.pipeline
    import prospect.forward
    import prospect.objectives.kto
    import prospect.reference
    from prospect.config import build_config
    from prospect.train import train

    if name == "separate records":  # each rated turn its own sequence, as before per-turn labels
        prospect.data.pipeline.fold_conversations = lambda examples: (examples, 0)
    counts = {"forwards": 0, "sequences": 0, "tokens": 0}
    original = prospect.forward.sequence_logps

    def counted(hidden_model, head, batch, device, prompt_cache=None):
        counts["forwards"] += 1
        counts["sequences"] += batch.cu_seq_lens.numel() - 1
        counts["tokens"] += batch.num_tokens
        return original(hidden_model, head, batch, device, prompt_cache)

    for module in (prospect.objectives.kto, prospect.reference):
        module.sequence_logps = counted
    config = build_config({
        "model_name_or_path": model, "stage": "kto", "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all",
        "dataset": "rated", "dataset_dir": str(data / ("turns" if name == "rated turns" else "separate")),
        "template": "auto", "cutoff_len": 2048, "output_dir": str(output_dir), "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8, "num_train_epochs": 1, "learning_rate": 5e-5, "logging_steps": 1,
        "save_steps": 1_000_000, "plot_loss": False, "report_to": "none", "seed": 42,
        "cache_dir": str(output_dir.parent / f"cache-{output_dir.name}"),
    })
    start = time.perf_counter()
    results = train(config)
    return {**counts, "examples": results["num_examples"], "reference_seconds": results["reference_seconds"],
            "step_seconds": results["num_tokens"] / results["tokens_per_second"],
            "total_seconds": time.perf_counter() - start, "train_tokens": results["num_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--max-chars", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--one", nargs=3, metavar=("RUN", "DATA", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, data, output = args.one
        Path(output, "bench.json").write_text(json.dumps(one_run(name, Path(data), Path(output), args.model)))
        return
    measured: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="prospect-bench-turns-") as workdir:
        num_turns = write_data(Path(workdir), args.conversations, args.max_chars)
        for repeat in range(args.repeats):
            for number, name in enumerate(RUNS):
                output = Path(workdir) / f"run-{repeat}-{number}"
                subprocess.run([sys.executable, __file__, "--model", args.model, "--one", name, workdir, str(output)],
                               check=True, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                measured[name].append(json.loads((output / "bench.json").read_text()))
                print(f"repeat {repeat + 1}: {name}: {measured[name][-1]}", flush=True)
    median = {name: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
              for name, runs in measured.items()}
    ours, peer = median["rated turns"], median["separate records"]
    print(f"\n{args.conversations} conversations, {num_turns} rated turns; medians of {args.repeats} repeat(s)\n")
    print("| measure | rated turns (one pass per conversation) | separate records | ratio |")
    print("|---|---|---|---|")
    for key, label in (("sequences", "packed sequences forwarded"), ("tokens", "tokens forwarded"),
                       ("forwards", "forward calls"), ("reference_seconds", "reference pass (s)"),
                       ("step_seconds", "optimizer steps (s)"), ("total_seconds", "whole run (s)")):
        print(f"| {label} | {ours[key]:.4g} | {peer[key]:.4g} | {ours[key] / peer[key]:.2f}× |")


if __name__ == "__main__":
    main()
