"""prospect vs TRL on the same model, examples and hyperparameters (issue 6). CPU benchmark.

    python benchmarks/bench_vs_trl.py --stage kto --repeats 3            # KTO: prospect vs KTOTrainer
    python benchmarks/bench_vs_trl.py --stage sft --repeats 3            # SFT: prospect vs SFTTrainer
    python benchmarks/bench_vs_trl.py --stage epoch --repeats 3          # prospect KTO epoch vs SFT epoch
    python benchmarks/bench_vs_trl.py --stage kto --quick                # seconds: tiny model, 8 examples

Every run is a fresh subprocess (so peak RSS is that run's own, read with os.wait4), and the peers are
alternated (A B C A B C ...) so that a change of load on the machine hits all of them. Each run:
- gets the same examples: the first N records of the reference dataset whose *whole* encoded length
  fits the cutoff for both tools (prospect drops an example whose prompt exceeds cutoff_len and cuts
  the rest; TRL truncates), so neither truncates nor drops anything;
- trains LoRA rank 8 (alpha 16, dropout 0) on every linear layer but the head, AdamW, cosine schedule
  with the same warm-up steps, batch 4, no accumulation, 2 epochs, fp32, seed 42, gradient clipping 1.0;
- sees the examples in the same order in the first epoch: TRL gets them in prospect's epoch-0 order
  and samples sequentially (KTOTrainer requires sequential sampling anyway);
- is timed from the start of the job (after the shared libraries are imported) to the saved adapter:
  model load, data preparation, reference log-probs, the training loop and saving included;
- runs prospect with the environment `prospect train` sets (prospect.allocator.ALLOCATOR_ENV: PyTorch's
  huge-page allocation for large tensors) and TRL with the machine's; `--peers` adds prospect without it
  (`prospect-glibc`) and TRL with it (`trl-*-thp`), so the allocator's share of a memory ratio is visible.
- `--peers` also takes `prospect-compile`: prospect with `torch_compile: true` (each decoder layer compiled).

KTO: TRL gets the conversational prompt/completion layout and SmolLM2's own chat template (prospect:
`template: auto`). SFT (glaive tool calls): SmolLM2's Jinja template cannot render tools, so prospect
uses `template: chatml` (SmolLM2's own <|im_start|>/<|im_end|> markers, tools in Qwen's format) and TRL
gets exactly prospect's token ids and loss mask (a processed `input_ids`/`labels` dataset).

TRL is a benchmark peer only: it is imported in the TRL child processes, never by `prospect`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROSPECT_SHARED_DIR", REPO.parent / "shared")) / "data"
EMBEDDED = "smollm2-135m-instruct"

DATASETS = {  # stage -> (dataset name in dataset_info.json, cutoff_len, prospect template, learning rate)
    "kto": ("kto_en_demo", 512, "auto", 5.0e-6),
    "sft": ("glaive_toolcall_en_demo", 1024, "chatml", 1.0e-4),
}
QUICK_CUTOFF = {"kto": 192, "sft": 384}  # --quick: short examples only, and by default two peers
DEFAULT_PEERS = {"kto": ["prospect", "trl-defaults", "trl-fastest"],  # the rest: opt-in with --peers
                 "sft": ["prospect", "trl-defaults", "trl-padding-free", "trl-packing"]}
QUICK_PEERS = {"kto": "prospect,trl-fastest", "sft": "prospect,trl-padding-free", "epoch": "prospect-kto,prospect-sft"}
BATCH, EPOCHS, SEED, LORA_RANK, LORA_ALPHA, BETA, WARMUP_RATIO = 4, 2, 42, 8, 16, 0.1, 0.1

# The peers of each stage: name -> (tool, settings)
PEERS = {
    "kto": {
        "prospect": ("prospect", {}),
        "trl-defaults": ("trl", {}),  # gradient checkpointing on, reference model run every step
        "trl-fastest": ("trl", {"gradient_checkpointing": False, "precompute_ref_log_probs": True}),
        # opt-in (--peers): prospect with glibc's plain heap (prospect train sets THP_MEM_ALLOC_ENABLE=1,
        # see prospect.launch), and TRL with the allocator setting prospect makes (README, "Memory")
        "prospect-glibc": ("prospect", {"env": {"THP_MEM_ALLOC_ENABLE": "0"}}),
        "prospect-compile": ("prospect", {"torch_compile": True}),  # opt-in: decoder layers compiled
        "trl-defaults-thp": ("trl", {"env": {"THP_MEM_ALLOC_ENABLE": "1"}}),
        "trl-fastest-thp": ("trl", {"gradient_checkpointing": False, "precompute_ref_log_probs": True,
                                    "env": {"THP_MEM_ALLOC_ENABLE": "1"}}),
    },
    "sft": {
        "prospect": ("prospect", {}),
        "trl-defaults": ("trl", {}),  # gradient checkpointing on, padded batches
        "trl-padding-free": ("trl", {"gradient_checkpointing": False, "padding_free": True, "max_length": None}),
        "trl-packing": ("trl", {"gradient_checkpointing": False, "packing": True}),  # bfd packing into 1024-token rows
        "prospect-glibc": ("prospect", {"env": {"THP_MEM_ALLOC_ENABLE": "0"}}),  # opt-in, as for KTO
        "prospect-compile": ("prospect", {"torch_compile": True}),  # opt-in, as for KTO
        "trl-defaults-thp": ("trl", {"env": {"THP_MEM_ALLOC_ENABLE": "1"}}),
    },
    "epoch": {  # prospect alone: KTO vs SFT over the same KTO examples
        "prospect-kto": ("prospect", {"stage": "kto"}),
        "prospect-sft": ("prospect", {"stage": "sft"}),
    },
}


# --------------------------------------------------------------------------------------------------
# Choosing the examples (parent process)


def load_records(name: str) -> tuple[list[dict], dict]:
    info = json.loads((SHARED_DATA / "dataset_info.json").read_text())[name]
    records = json.loads((SHARED_DATA / info["file_name"]).read_text())
    return records, info


def trl_kto_row(record: dict) -> dict:
    """kto_en_demo record -> TRL's conversational unpaired-preference layout."""
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": bool(record["label"])}


def select_examples(stage: str, n: int, cutoff: int, template: str, model: str, workdir: Path,
                    scan: int) -> dict:
    """The first `n` records whose whole encoded length fits `cutoff` for both tools.

    Writes `workdir/data/{dataset_info.json, subset.json}` (prospect reads them) and returns what the
    TRL children need: the TRL rows (KTO) or prospect's token ids and labels (SFT), in dataset order."""
    from prospect.config import build_config
    from prospect.data.pipeline import prepare_data
    from prospect.model import load_tokenizer

    data_stage = "kto" if stage in ("kto", "epoch") else "sft"
    name = DATASETS[data_stage][0]
    records, info = load_records(name)
    records = records[:scan]
    tokenizer = load_tokenizer(model)
    scan_dir = workdir / "scan"
    scan_dir.mkdir(parents=True, exist_ok=True)
    (scan_dir / "dataset_info.json").write_text(json.dumps({"all": {**info, "file_name": "all.json"}}))
    (scan_dir / "all.json").write_text(json.dumps(records))
    config = build_config(dict(stage=data_stage, model_name_or_path=model, dataset=["all"], dataset_dir=str(scan_dir),
                               template=template, cutoff_len=10**6, cache_dir=str(workdir / "cache"),
                               overwrite_cache=True))
    encoded = prepare_data(config, tokenizer).train
    origins = encoded["origin"]
    chosen = []
    for row, origin in zip(encoded, origins):
        index = int(origin.rsplit("#", 1)[1])
        fits = len(row["input_ids"]) <= cutoff
        if data_stage == "kto":  # TRL's own tokenization: prompt with generation prompt + the rest
            trl = trl_kto_row(records[index])
            full = tokenizer.apply_chat_template(trl["prompt"] + trl["completion"], tokenize=True, return_dict=True)
            fits = fits and len(full["input_ids"]) <= cutoff
        if fits:
            chosen.append(index)
        if len(chosen) == n:
            break
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} of the first {scan} {name} records fit cutoff_len {cutoff}; "
                         "raise --scan or lower --examples")
    subset = [records[i] for i in chosen]
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps({"subset": {**info, "file_name": "subset.json"}}))
    (data_dir / "subset.json").write_text(json.dumps(subset, ensure_ascii=False))
    by_origin = {int(o.rsplit("#", 1)[1]): row for o, row in zip(origins, encoded)}
    return {
        "indices": chosen,
        "trl_kto_rows": [trl_kto_row(r) for r in subset] if data_stage == "kto" else None,
        "sft_rows": [{"input_ids": by_origin[i]["input_ids"], "labels": by_origin[i]["labels"]} for i in chosen],
        "num_trained_tokens": sum(sum(1 for y in by_origin[i]["labels"][1:] if y != -100) for i in chosen),
        "num_tokens": sum(len(by_origin[i]["input_ids"]) for i in chosen),
    }


def epoch0_order(n: int) -> list[int]:
    """The order in which prospect's first epoch visits the examples (prospect.batching.step_examples)."""
    import random

    order = list(range(n))
    random.Random(f"{SEED}-0").shuffle(order)
    return order


def make_tiny_model(workdir: Path) -> str:
    """--quick: a 2-layer random Llama with SmolLM2's tokenizer, saved as a plain HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prospect.model import load_tokenizer

    folder = workdir / "tiny-model"
    tokenizer = load_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


# --------------------------------------------------------------------------------------------------
# One run (child process)


def _common_imports() -> None:
    """Imported before the clock starts, in every child: the libraries both tools stand on."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    _common_imports()
    if spec["tool"] == "trl":
        import trl  # noqa: F401  (the peer's own import, also outside the clock)
    else:
        import prospect.train  # noqa: F401
    start = time.perf_counter()
    result = run_prospect(spec) if spec["tool"] == "prospect" else run_trl(spec)
    result["wall_seconds"] = time.perf_counter() - start
    result["threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(result))


def run_prospect(spec: dict) -> dict:
    from prospect import tracking
    from prospect.config import build_config
    from prospect.train import train

    step_times = []
    original_log = tracking.Tracker.log

    def timed_log(self, step, metrics, split="train", epoch=None):  # logging_steps 1: once per optimizer step
        if split == "train":
            step_times.append(time.perf_counter())
        return original_log(self, step, metrics, split=split, epoch=epoch)

    tracking.Tracker.log = timed_log
    settings = spec["settings"]
    stage = settings.get("stage", spec["stage"])
    raw = dict(
        stage=stage, model_name_or_path=spec["model"], dataset=["subset"], dataset_dir=spec["data_dir"],
        template=spec["template"], cutoff_len=spec["cutoff"], per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, num_train_epochs=EPOCHS, learning_rate=spec["learning_rate"],
        lr_scheduler_type="cosine", warmup_steps=spec["warmup_steps"], pref_beta=BETA, lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_target=["all"], seed=SEED, bf16=False,
        output_dir=spec["output_dir"], overwrite_output_dir=True, logging_steps=1, save_steps=10**6,
        report_to=["none"], overwrite_cache=True, cache_dir=spec["cache_dir"], max_grad_norm=1.0,
        torch_compile=settings.get("torch_compile", False),
    )
    start = time.perf_counter()
    results = train(build_config(raw))
    losses = [json.loads(line)["loss"] for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    return {
        "num_examples": results["num_examples"], "num_steps": results["num_steps"],
        "trained_tokens": int(results["num_trained_tokens"]), "tokens": int(results["num_tokens"]),
        "losses": losses, "step_end_seconds": [t - start for t in step_times],
        "steps_per_epoch": math.ceil(results["num_examples"] / BATCH),
    }


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    settings = dict(spec["settings"])
    settings.pop("env", None)
    stage = spec["stage"]
    start = time.perf_counter()
    step_times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - start)

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    common = dict(
        output_dir=spec["output_dir"], per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_train_epochs=EPOCHS, learning_rate=spec["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_steps"], weight_decay=0.0, max_grad_norm=1.0, seed=SEED, bf16=False,
        use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    order = spec["order"]
    if stage == "kto":
        from trl import KTOConfig, KTOTrainer

        rows = [spec["trl_kto_rows"][i] for i in order]
        args = KTOConfig(**common, beta=BETA, max_length=spec["cutoff"], **settings)
        trainer = KTOTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimes()])
        dataset = trainer.train_dataset
        trained = sum(len(c) for c in dataset["completion_ids"])  # TRL's completion tokens (its own count)
        tokens = sum(len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["completion_ids"]))
    else:
        from trl import SFTConfig, SFTTrainer

        rows = [spec["sft_rows"][i] for i in order]
        settings.setdefault("max_length", spec["cutoff"])
        args = SFTConfig(**common, **settings)
        trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[StepTimes()])
        labels = trainer.train_dataset["labels"]
        trained = sum(sum(1 for y in row[1:] if y != -100) for row in labels)
        tokens = sum(len(row) for row in labels)
    num_rows = len(trainer.train_dataset)
    trainer.train()
    trainer.save_model(spec["output_dir"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "num_examples": len(rows), "num_rows": num_rows, "num_steps": trainer.state.global_step,
        "trained_tokens": trained * EPOCHS, "tokens": tokens * EPOCHS, "losses": losses,
        "step_end_seconds": step_times, "steps_per_epoch": math.ceil(num_rows / BATCH),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------------
# The parent: alternate the runs, then print the table


def launch(spec: dict, workdir: Path, log_name: str) -> dict:
    spec_path = workdir / f"{log_name}.spec.json"
    spec["result"] = str(workdir / f"{log_name}.result.json")
    spec_path.write_text(json.dumps(spec))
    from prospect.allocator import ALLOCATOR_ENV

    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(workdir / f"{log_name}.hf-cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if spec["tool"] == "prospect":  # what `prospect train` sets before torch is imported
        env.update(ALLOCATOR_ENV)
    env.update(spec["settings"].get("env", {}))
    with open(workdir / f"{log_name}.log", "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, __file__, "--child", str(spec_path)], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
    if process.returncode != 0:
        tail = (workdir / f"{log_name}.log").read_text()[-3000:]
        raise SystemExit(f"{log_name} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    result["process_seconds"] = elapsed
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def load_average() -> float:
    return os.getloadavg()[0]


def default_threads() -> int:
    """2 torch threads (this machine's cores); a busy machine is reported, not silently worked around."""
    load = load_average()
    if load > 1.5:
        print(f"warning: the 1-min load average is {load:.2f}: something else is running, so the "
              "timings will be slower than on an idle machine (wait, or pass --threads 1)", file=sys.stderr, flush=True)
    return 2


def epoch_seconds(result: dict, epoch: int) -> float:
    """Seconds of epoch `epoch` (0-based) from the end-of-step timestamps."""
    ends, per = result["step_end_seconds"], result["steps_per_epoch"]
    first, last = epoch * per, (epoch + 1) * per - 1
    return ends[last] - (ends[first - 1] if first > 0 else 0.0)


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} – {statistics.median(values):.2f} – {max(values):.2f}"


def report(stage: str, runs: dict[str, list[dict]], meta: dict) -> str:
    lines = []
    peers = list(runs)
    ours = peers[0]
    lines.append(f"stage {stage}: {meta['examples']} examples × {EPOCHS} epochs, batch {BATCH}, cutoff "
                 f"{meta['cutoff']}, model {meta['model_name']}, {meta['threads']} threads, "
                 f"{meta['repeats']} repeat(s); 1-min load average {meta['load_before']:.2f} before, "
                 f"{meta['load_after']:.2f} after (mean {statistics.mean(meta['loads']):.2f} at run starts)")
    lines.append("")
    lines.append("| run | optimizer steps | wall s (median) | trained tok/s (median) | peak RSS MiB (median) |")
    lines.append("|---|---|---|---|---|")
    for name in peers:
        rs = runs[name]
        lines.append(
            f"| {name} | {rs[0]['num_steps']} | {statistics.median(r['wall_seconds'] for r in rs):.1f} | "
            f"{statistics.median(r['trained_tokens'] / r['wall_seconds'] for r in rs):.0f} | "
            f"{statistics.median(r['peak_rss_bytes'] for r in rs) / 2**20:.0f} |")
    lines.append("")
    if stage != "epoch":
        lines.append(f"Ratios {ours}/peer, min – median – max over the {meta['repeats']} repeat(s) "
                     "(run i of ours against run i of the peer, started next to each other):")
        lines.append("")
        lines.append("| peer | wall time | trained tokens/s | peak RSS |")
        lines.append("|---|---|---|---|")
        for name in peers[1:]:
            pairs = list(zip(runs[ours], runs[name]))
            lines.append(
                f"| {name} | {spread([a['wall_seconds'] / b['wall_seconds'] for a, b in pairs])} | "
                f"{spread([(a['trained_tokens'] / a['wall_seconds']) / (b['trained_tokens'] / b['wall_seconds']) for a, b in pairs])} | "
                f"{spread([a['peak_rss_bytes'] / b['peak_rss_bytes'] for a, b in pairs])} |")
        lines.append("")
        n = min(8, min(len(r[0]["losses"]) for r in runs.values()))
        lines.append(f"First {n} optimizer steps' losses (repeat 1):")
        lines.append("")
        lines.append("| step | " + " | ".join(peers) + " |")
        lines.append("|---|" + "---|" * len(peers))
        for step in range(n):
            lines.append(f"| {step + 1} | " + " | ".join(f"{runs[p][0]['losses'][step]:.4f}" for p in peers) + " |")
        lines.append("")
        lines.append("trained tokens per run (each tool's own count, all epochs): " + ", ".join(
            f"{p} {runs[p][0]['trained_tokens']}" for p in peers))
        lines.append("wall = the job from model loading to the saved adapter (imports excluded); process wall "
                     "(imports included), median: " + ", ".join(
                         f"{p} {statistics.median(r['process_seconds'] for r in runs[p]):.1f} s" for p in peers))
    # epoch times (the second epoch: after the first, nothing is warmed up or precomputed any more)
    lines.append("")
    lines.append("Second-epoch seconds (from per-step end times), min – median – max: " + "; ".join(
        f"{p} {spread([epoch_seconds(r, 1) for r in runs[p]])}" for p in peers if runs[p][0]["num_steps"] >= 2 * runs[p][0]["steps_per_epoch"]))
    if stage == "epoch":
        pairs = list(zip(runs["prospect-kto"], runs["prospect-sft"]))
        lines.append("KTO epoch / SFT epoch over the same examples (epoch 2): "
                     f"{spread([epoch_seconds(a, 1) / epoch_seconds(b, 1) for a, b in pairs])}; "
                     f"whole job: {spread([a['wall_seconds'] / b['wall_seconds'] for a, b in pairs])}")
    return "\n".join(lines)


def report_saved(saved: dict) -> str:
    """The table of saved results, over the repeats every peer completed."""
    repeats = min(len(rs) for rs in saved["runs"].values())
    if repeats == 0:
        raise SystemExit("no complete repeat saved: every peer needs at least one run")
    runs = {name: rs[:repeats] for name, rs in saved["runs"].items()}
    return report(saved["meta"]["stage"], runs, dict(saved["meta"], repeats=repeats))


def merge_saved(saved_files: list[dict]) -> dict:
    """Several --json files of one stage and peer set as one: the complete repeats of each, in order (a
    benchmark split over several invocations). Each file's unfinished repeat is left out, not re-paired."""
    first = saved_files[0]
    merged = {"meta": dict(first["meta"], loads=[]), "runs": {name: [] for name in first["runs"]}}
    for saved in saved_files:
        if saved["meta"]["stage"] != first["meta"]["stage"] or list(saved["runs"]) != list(first["runs"]):
            raise SystemExit("--report: the files must hold the same stage and peers "
                             f"({first['meta']['stage']} {list(first['runs'])} vs {saved['meta']['stage']} {list(saved['runs'])})")
        repeats = min(len(rs) for rs in saved["runs"].values())
        for name, rs in saved["runs"].items():
            merged["runs"][name] += rs[:repeats]
        merged["meta"]["loads"] += saved["meta"]["loads"]
        merged["meta"]["load_after"] = saved["meta"]["load_after"]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=["kto", "sft", "epoch"], default="kto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 8 examples, 1 repeat")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run (default: 2; warns when the machine is busy)")
    parser.add_argument("--peers", default=None, help="comma list of peers to run (default: all of the stage)")
    parser.add_argument("--scan", type=int, default=300, help="how many records to look at when choosing examples")
    parser.add_argument("--workdir", default=None, help="keep the runs' folders and logs here")
    parser.add_argument("--json", default=None,
                        help="write all results to this JSON file (rewritten after every run, so a stopped "
                             "benchmark keeps what it measured)")
    parser.add_argument("--report", default=None, nargs="+", metavar="JSON",
                        help="print the table of --json files (their complete repeats; several files of the "
                             "same stage and peers are reported as one benchmark)")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    if args.report:
        print(report_saved(merge_saved([json.loads(Path(path).read_text()) for path in args.report])))
        return

    if args.quick:  # checks the script end to end; the numbers mean nothing
        args.examples, args.repeats = min(args.examples, 8), 1
        if args.peers is None:
            args.peers = QUICK_PEERS[args.stage]
    threads = args.threads or default_threads()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prospect-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from prospect.model import model_folder

    model = make_tiny_model(workdir) if args.quick else model_folder(EMBEDDED)
    data_stage = "kto" if args.stage in ("kto", "epoch") else "sft"
    _, cutoff, template, lr = DATASETS[data_stage]
    if args.quick:
        cutoff = QUICK_CUTOFF[data_stage]
    chosen = select_examples(args.stage, args.examples, cutoff, template, model, workdir, args.scan)
    steps = math.ceil(args.examples / BATCH) * EPOCHS
    peers = {name: PEERS[args.stage][name] for name in DEFAULT_PEERS.get(args.stage, PEERS[args.stage])}
    if args.peers:
        wanted = args.peers.split(",")
        unknown = [p for p in wanted if p not in PEERS[args.stage]]
        if unknown:
            raise SystemExit(f"unknown peers {unknown}; this stage has {list(PEERS[args.stage])}")
        peers = {name: PEERS[args.stage][name] for name in wanted}
    base = dict(stage=data_stage, model=model, cutoff=cutoff, template=template, learning_rate=lr,
                warmup_steps=math.ceil(WARMUP_RATIO * steps), threads=threads, data_dir=str(workdir / "data"),
                trl_kto_rows=chosen["trl_kto_rows"], sft_rows=chosen["sft_rows"], order=epoch0_order(args.examples))
    print(f"{args.examples} examples (records {chosen['indices'][:5]}... of {DATASETS[data_stage][0]}), "
          f"{chosen['num_trained_tokens']} trained tokens per epoch by prospect's count, {threads} threads, "
          f"workdir {workdir}", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in peers}
    loads = []
    load_before = load_average()
    meta = dict(stage=args.stage, examples=args.examples, cutoff=cutoff, threads=threads,
                model_name="tiny random Llama" if args.quick else "SmolLM2-135M-Instruct fp32",
                load_before=load_before, loads=loads)  # loads grows in place; load_after set when saved
    for repeat in range(args.repeats):
        for name, (tool, settings) in peers.items():
            tag = f"{name}-{repeat}"
            loads.append(load_average())
            spec = dict(base, tool=tool, settings=settings, output_dir=str(workdir / tag),
                        cache_dir=str(workdir / f"{tag}.cache"))
            result = launch(spec, workdir, tag)
            runs[name].append(result)
            print(f"  {tag}: wall {result['wall_seconds']:.1f} s, {result['num_steps']} steps, "
                  f"peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB, load {loads[-1]:.2f}, "
                  f"first losses {[round(x, 4) for x in result['losses'][:3]]}", flush=True)
            if args.json:
                meta.update(load_after=load_average())
                Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    for name, rs in runs.items():  # the same work: examples and optimizer steps
        if name not in ("trl-packing",) and rs[0]["num_steps"] != steps:
            raise SystemExit(f"{name} ran {rs[0]['num_steps']} optimizer steps, expected {steps}")
        if rs[0]["num_examples"] != args.examples:
            raise SystemExit(f"{name} trained on {rs[0]['num_examples']} examples, expected {args.examples}")
    meta.update(load_after=load_average())
    text = report_saved({"meta": meta, "runs": runs})
    print()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}  python benchmarks/bench_vs_trl.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": runs, "table": text}, indent=1))


if __name__ == "__main__":
    main()
