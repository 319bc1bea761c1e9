"""Where the time of one prospect optimizer step goes, on CPU (issue 6, "Where the time goes").

    python benchmarks/profile_step.py --stage kto            # phases of a KTO step, mean over steps 2..N
    python benchmarks/profile_step.py --stage sft --ops      # + torch.profiler's top operators of one step

It runs the real `prospect.train.train` on the benchmark's examples (the same selection as
bench_vs_trl.py: the first 64 records that fit the cutoff) for `--steps` optimizer steps, with timers
wrapped around the functions the loop calls, so the numbers are those of the real loop:

    data/packing        Examples.targets / kl_pairs / kl_continuations / labels (token ids -> packed rows)
    KL pass             KTO only: the policy's no-grad forward over the step's KL pairs (with one micro-batch:
                        only the partners' completions, on the prompts cached by the forward), decoder + log-probs
    forward             the decoder's forward with grad (HiddenStates, LoRA included)
    log-probs           token_logps with grad: the head matmul, logsumexp and (frozen head) d logp/d hidden
    loss                kto_loss / the NLL sum
    backward            accelerator.backward (decoder backward, LoRA gradients)
    optimizer           clip_grad_norm_ + AdamW step + scheduler + zero_grad
    other               the rest of the step (metrics, bookkeeping)

and, once per run, the KTO reference log-probs (computed before training, then cached). Times are
exclusive (a nested phase is not counted in its parent). The first step is left out of the means
(allocator warm-up).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_vs_trl as bench  # noqa: E402  (the example selection and hyperparameters)


class Timers:
    """Exclusive wall time per label, with a stack so nested phases are not double-counted."""

    def __init__(self) -> None:
        self.totals = collections.defaultdict(float)
        self.stack: list[list] = []  # [label, start, child_time]

    def wrap(self, fn, label):
        timers = self

        def wrapped(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            timers.stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                name, start, children = timers.stack.pop()
                elapsed = time.perf_counter() - start
                timers.totals[name] += elapsed - children
                if timers.stack:
                    timers.stack[-1][2] += elapsed

        return wrapped

    def take(self) -> dict:
        out, self.totals = dict(self.totals), collections.defaultdict(float)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["kto", "sft"], default="kto")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps to run (the first is left out)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 2; warns when the machine is busy)")
    parser.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators of step 3")
    parser.add_argument("--kto-data-for-sft", action="store_true",
                        help="SFT on the KTO examples (cutoff 512), to compare a KTO step with an SFT step")
    parser.add_argument("--set", action="append", default=[], help="extra prospect config key=value")
    parser.add_argument("--no-prompt-cache", action="store_true",
                        help="KTO: run the KL pass on whole KL pairs (what the prompt cache saves)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import os

    threads = args.threads or bench.default_threads()
    from prospect.allocator import set_allocator_env

    set_allocator_env()  # as `prospect train` does, before torch is imported
    import torch

    torch.set_num_threads(threads)
    import accelerate
    import accelerate.optimizer

    import prospect.batching
    import prospect.forward
    import prospect.objectives.kto
    import prospect.train as T
    from prospect import tracking
    from prospect.objectives.kto import KTO
    from prospect.objectives.sft import SFT
    from prospect.config import build_config
    from prospect.model import model_folder

    workdir = Path(tempfile.mkdtemp(prefix="prospect-profile-"))
    model = model_folder(bench.EMBEDDED)
    data_stage = "kto" if (args.stage == "kto" or args.kto_data_for_sft) else "sft"
    _, cutoff, template, lr = bench.DATASETS[data_stage]
    bench.select_examples(data_stage, args.examples, cutoff, template, model, workdir, 300)
    steps_total = math.ceil(args.examples / bench.BATCH) * bench.EPOCHS

    timers = Timers()
    grad = lambda: torch.is_grad_enabled()  # noqa: E731
    phase = {"name": "setup"}  # "reference" while the reference log-probs are computed, "step" in the loop

    def forward_label(*a, **k):
        if phase["name"] == "reference":
            return "reference: decoder forward"
        return "forward (decoder, grad)" if grad() else "KL pass: decoder forward (no grad)"

    def logps_label(*a, **k):
        if phase["name"] == "reference":
            return "reference: log-probs"
        return "log-probs (token_logps, grad)" if grad() else "KL pass: log-probs (no grad)"

    Examples = prospect.batching.Examples
    prospect.forward.HiddenStates.forward = timers.wrap(prospect.forward.HiddenStates.forward, forward_label)
    prospect.forward.token_logps = timers.wrap(prospect.forward.token_logps, logps_label)
    Examples.targets = timers.wrap(Examples.targets, "data/packing")
    Examples.kl_pairs = timers.wrap(Examples.kl_pairs, "data/packing")
    Examples.kl_continuations = timers.wrap(Examples.kl_continuations, "data/packing")
    Examples.labels = timers.wrap(Examples.labels, "data/packing")
    prospect.objectives.kto.kto_loss = timers.wrap(prospect.objectives.kto.kto_loss, "loss")
    if args.no_prompt_cache:
        Examples.prompt_cache = lambda self, indices, hidden_model: None
    accelerate.Accelerator.backward = timers.wrap(accelerate.Accelerator.backward, "backward")
    accelerate.Accelerator.clip_grad_norm_ = timers.wrap(accelerate.Accelerator.clip_grad_norm_, "optimizer")
    accelerate.optimizer.AcceleratedOptimizer.step = timers.wrap(accelerate.optimizer.AcceleratedOptimizer.step,
                                                                 "optimizer")
    accelerate.optimizer.AcceleratedOptimizer.zero_grad = timers.wrap(
        accelerate.optimizer.AcceleratedOptimizer.zero_grad, "optimizer")

    original_reference = prospect.objectives.kto.load_or_compute_reference
    reference_seconds = {}

    def timed_reference(*a, **k):
        phase["name"] = "reference"
        start = time.perf_counter()
        try:
            return original_reference(*a, **k)
        finally:
            reference_seconds["total"] = time.perf_counter() - start
            reference_seconds.update(timers.take())
            phase["name"] = "step"

    prospect.objectives.kto.load_or_compute_reference = timed_reference

    step_records = []
    step_start = {"t": None}
    profiler = {"p": None}
    objective = KTO if args.stage == "kto" else SFT
    original_step = objective.step

    def timed_step(*a, **k):
        phase["name"] = "step"
        if step_start["t"] is None:
            timers.take()  # drop setup-time entries
        step_start["t"] = time.perf_counter()
        if args.ops and len(step_records) == 2:
            profiler["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler["p"].__enter__()
        return original_step(*a, **k)

    objective.step = timers.wrap(timed_step, "step-body")
    original_log = tracking.Tracker.log

    def timed_log(self, step, metrics, split="train", epoch=None):
        if split == "train" and step_start["t"] is not None:
            if profiler["p"] is not None:
                profiler["p"].__exit__(None, None, None)
                profiler["ops"] = profiler["p"].key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                profiler["p"] = None
            total = time.perf_counter() - step_start["t"]
            record = timers.take()
            record["other"] = record.pop("step-body", 0.0)
            record["total"] = total
            record["tokens_per_second"] = metrics.get("tokens_per_second")
            step_records.append(record)
        return original_log(self, step, metrics, split=split, epoch=epoch)

    tracking.Tracker.log = timed_log

    raw = dict(
        stage=args.stage, model_name_or_path=model, dataset=["subset"], dataset_dir=str(workdir / "data"),
        template=template, cutoff_len=cutoff, per_device_train_batch_size=bench.BATCH, num_train_epochs=bench.EPOCHS,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=math.ceil(bench.WARMUP_RATIO * steps_total),
        pref_beta=bench.BETA, lora_rank=bench.LORA_RANK, lora_alpha=bench.LORA_ALPHA, lora_target=["all"],
        seed=bench.SEED, output_dir=str(workdir / "run"), overwrite_output_dir=True, logging_steps=1,
        save_steps=10**6, report_to=["none"], cache_dir=str(workdir / "cache"), max_steps=args.steps,
    )
    for item in args.set:
        key, value = item.split("=", 1)
        raw[key] = json.loads(value) if value[:1] in "0123456789-[{tf" and value not in ("true", "false") else value
        if value in ("true", "false"):
            raw[key] = value == "true"
    import threading

    rss_peaks = collections.defaultdict(float)  # phase -> peak resident set size (sampled every 50 ms)
    stop = threading.Event()

    def sample_rss():
        page = os.sysconf("SC_PAGE_SIZE")
        while not stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            name = timers.stack[-1][0] if timers.stack and phase["name"] == "step" else phase["name"]
            rss_peaks[name] = max(rss_peaks[name], rss)
            stop.wait(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    T.train(build_config(raw))
    stop.set()
    sampler.join()

    kept = step_records[1:] or step_records
    labels = ["data/packing", "KL pass: decoder forward (no grad)", "KL pass: log-probs (no grad)",
              "forward (decoder, grad)", "log-probs (token_logps, grad)", "loss", "backward", "optimizer", "other"]
    mean_total = statistics.mean(r["total"] for r in kept)
    print(f"\n{args.stage.upper()} step, SmolLM2-135M-Instruct fp32, batch {bench.BATCH}, {threads} threads, "
          f"mean over steps 2..{len(step_records)} ({len(kept)} steps); load average {os.getloadavg()[0]:.2f}")
    print(f"{'phase':40s} {'ms/step':>9s} {'share':>7s}")
    for label in labels:
        values = [r.get(label, 0.0) for r in kept]
        if not any(values) and label.startswith("KL"):
            continue
        mean = statistics.mean(values)
        print(f"{label:40s} {mean * 1000:9.0f} {mean / mean_total:7.1%}")
    print(f"{'total':40s} {mean_total * 1000:9.0f}")
    print(f"tokens/s of these steps (prospect's metric): {statistics.mean(r['tokens_per_second'] for r in kept):.0f}")
    if reference_seconds:
        print(f"KTO reference log-probs, once for the {args.examples} examples (targets + KL pairs): "
              f"{reference_seconds['total']:.1f} s (decoder {reference_seconds.get('reference: decoder forward', 0):.1f} s, "
              f"log-probs {reference_seconds.get('reference: log-probs', 0):.1f} s)")
    print("peak resident memory (sampled) by phase, MiB: " + ", ".join(
        f"{name} {value / 2**20:.0f}" for name, value in sorted(rss_peaks.items(), key=lambda kv: -kv[1])))
    import resource

    print(f"peak RSS of the process (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if profiler.get("ops"):
        print("\ntorch.profiler, step 3, top operators by self CPU time:")
        print(profiler["ops"])
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": step_records, "reference": reference_seconds}, indent=1))


if __name__ == "__main__":
    main()
