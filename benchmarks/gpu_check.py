"""The GPU check: every GPU path of prospect on one GPU, PASS / FAIL / SKIP with its figures, in one call.

    python benchmarks/gpu_check.py prepare        # here, once, with PyPI: .gpu/ = bench_gpu.py's wheels and
                                                  # assets, plus bitsandbytes (its CUDA 13 and CPU libraries
                                                  # only) and liger-kernel; .gpu/ray/ = Ray's wheels
    # one device call (carry [".gpu"]), about 6 minutes on an H200:
    python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl &&
      PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py run --out $OUT
    # then, while the machine is warm (carry [".gpu/ray"]; .gpu/site and .gpu/work stay there):
    python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/ray/*.whl &&
      PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py ray --out $OUT
    # and (carry [".gpu/deepspeed"]) the sharded checks:
    python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/deepspeed/*.whl &&
      PYTHONPATH=.gpu/site:. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py shard --out $OUT
    python benchmarks/gpu_check.py run --tiny     # here, on CPU, a 2-layer model: checks the script

The model has Qwen2.5-0.5B's widths (hidden 896, 14 query / 2 key-value heads, MLP 4864, tied embeddings)
with 4 layers and the Llama-3 tokenizer (`llama3` template), random weights from one seed, saved once.
Every run trains LoRA r8 on all linear layers for 3 steps of 4 kto_en_demo examples (cutoff 512, lr 1e-3).

Checks (the GPU runs share one process, one after another; the float32 CPU runs are a second process,
run at the same time):
  bf16-sft, bf16-kto  bf16 LoRA on the GPU against the float32 CPU path on the same model, data and seed:
                      every logged loss within 2% (SFT) / 0.01 (KTO), KTO reference log-probs within 1%.
  qlora-kto           quantization_bit: 4 (nf4, double quantization) on the GPU: 4-bit layers, losses within
                      0.02 of bf16 LoRA's, peak memory of both.
  liger-kto           enable_liger_kernel: liger's RMSNorm / SwiGLU forward on the layers, losses within 0.01
                      of bf16 LoRA's (run last: liger patches the model classes for the whole process).
  fa2                 flash_attn: fa2 on CUDA (the flash-attn package's kernel, or PyTorch's own variable-length
                      one, `prospect_varlen`) against bf16 LoRA with SDPA per sequence; on CPU,
                      `prospect train ... flash_attn=fa2` must exit 2 naming the reason.
  ray-1gpu            (`ray`) the bf16-kto run through Ray Train with one GPU worker: the same losses.
  fsdp-offload        (`shard`) the bf16-kto run with fsdp: full_shard offload (FSDP2 on one process, the
                      shards in CPU memory): losses within 0.01 of bf16-kto's, and both peak GPU memories.
  zero3-offload,      (`shard`) the same with deepspeed: examples/deepspeed/ds_z3_offload_config.json (weights
  zero2-offload       and optimizer state in CPU memory) and ds_z2_offload_config.json (optimizer state):
                      DeepSpeed through Accelerate on one process, losses within 0.02 of bf16-kto's (its
                      bfloat16 weights are not autocast), both peak GPU memories.
Then `run` ends with bench_gpu.py's throughput table (prospect-kto, trl-kto-fastest, prospect-sft on the
Llama-3-8B shape, fewer steps than its default), as long as the time budget allows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402  (its assets, wheels and tiny shape)

ASSETS = bench_gpu.ASSETS
WORK = ASSETS / "work"  # kept on a warm device machine between calls (an ignored path)
EXTRA_WHEELS = ["liger-kernel==0.8.5", "bitsandbytes==0.50.2"]
RAY_WHEELS = ["ray==2.60.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1", "referencing==0.37.0",
              "rpds-py==2026.9.1", "msgpack==1.2.4", "pydantic==2.14.4", "pydantic-core==2.50.5",
              "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0", "tensorboardX==2.6.5"]
DEEPSPEED = "deepspeed==0.19.8"
DEEPSPEED_WHEELS = ["hjson==3.1.0", "py-cpuinfo==9.0.0", "ninja==1.13.2", "einops==0.8.2", "msgpack==1.2.4",
                    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
                    "typing-extensions==4.16.0"]
# Members of big wheels a Linux CUDA 13 machine never loads (the carry is limited to 64 MiB).
SLIM = {"bitsandbytes": lambda name: "libbitsandbytes_cuda" in name and "cuda130" not in name,
        "ray": lambda name: name.startswith("ray/jars/") or name.endswith(".js.map")}
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
             num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=4096)
SEED = 42
STEPS, BATCH, CUTOFF, LEARNING_RATE = 3, 4, 512, 1e-3


# --------------------------------------------------------------------------------------------------
# Here: what the device calls carry


def download(names: list[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(dest), *names], check=True)


def slim_wheel(wheel: Path, drop) -> None:
    """Rewrite `wheel` without the members `drop(name)` selects (and their RECORD lines)."""
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if drop(item.filename):
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(line for line in data.split(b"\n") if not drop(line.split(b",")[0].decode()))
            target.writestr(item, data)
    slimmed.replace(wheel)


def prepare() -> None:
    bench_gpu.prepare()
    download(EXTRA_WHEELS, ASSETS / "wheels")
    download(RAY_WHEELS, ASSETS / "ray")
    # deepspeed is published as a source package: its pure-Python wheel is built here (its ops compile on use)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(ASSETS / "deepspeed"),
                    DEEPSPEED], check=True)
    download(DEEPSPEED_WHEELS, ASSETS / "deepspeed")
    for folder in (ASSETS / "wheels", ASSETS / "ray"):
        for wheel in folder.glob("*.whl"):
            package = wheel.name.split("-")[0].lower()
            if package in SLIM:
                slim_wheel(wheel, SLIM[package])
    for folder in (ASSETS, ASSETS / "ray", ASSETS / "deepspeed"):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and (
            folder != ASSETS or not {"ray", "deepspeed"} & set(f.relative_to(ASSETS).parts)))
        print(f"{folder}: {size / 2**20:.1f} MiB (a device call carries at most 64 MiB)")


# --------------------------------------------------------------------------------------------------
# The runs (in the child processes)


def save_model(folder: Path, tokenizer_dir: Path, tiny: bool) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    shape = dict(bench_gpu.TINY, tie_word_embeddings=True) if tiny else SHAPE
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(SEED)
    Qwen2ForCausalLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def run_config(spec: dict, name: str, **settings):
    """The config every check trains with (3 steps of 4 examples), output in the workdir's `name`."""
    from prospect.config import build_config

    return build_config(dict(
        model_name_or_path=spec["model_dir"], dataset=[bench_gpu.DATASET], dataset_dir=spec["data_dir"],
        template="llama3", cutoff_len=CUTOFF, max_samples=BATCH * STEPS, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, max_steps=STEPS, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", lora_rank=8, lora_alpha=16, seed=SEED,
        output_dir=str(Path(spec["workdir"]) / name), overwrite_output_dir=True, logging_steps=1, save_steps=10**6, report_to=["none"], overwrite_cache=True,
        cache_dir=str(Path(spec["workdir"]) / f"{name}.cache"), **settings))


def train_once(spec: dict, name: str, **settings) -> dict:
    """One prospect run; its logged losses, peak GPU memory, reference log-probs and layer classes."""
    import torch

    import prospect.train

    built = []
    original = prospect.train.load_trainable_model

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    prospect.train.load_trainable_model = spy
    output_dir = Path(spec["workdir"]) / name
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        prospect.train.train(run_config(spec, name, **settings))
    finally:
        prospect.train.load_trainable_model = original
    model = built[-1]
    layer = model.get_base_model().model.layers[0]
    result = {
        "seconds": time.perf_counter() - start,
        "losses": [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line).get("split") == "train"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "q_proj": type(layer.self_attn.q_proj.base_layer).__name__,
        "norm_forward": getattr(layer.input_layernorm.forward, "__qualname__", ""),
        "mlp_forward": getattr(layer.mlp.forward, "__qualname__", ""),
        "attention": model.get_base_model().config._attn_implementation,
    }
    reference = output_dir / "reference_logps.safetensors"
    if reference.is_file():
        from safetensors.torch import load_file

        logps = load_file(str(reference))["train_logps"]
        result["reference_logps"] = [float(v) for v in logps if v == v]  # the computed ones (not NaN)
    del built, model, layer
    if gpu:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return result


def refused(spec: dict, override: str) -> dict:
    """`prospect train` with `override`: its exit code and message (capturing stderr)."""
    config_file = Path(spec["workdir"]) / "refused.yaml"
    config_file.write_text(json.dumps(dict(model_name_or_path=spec["model_dir"], dataset=bench_gpu.DATASET,
                                           dataset_dir=spec["data_dir"], template="llama3", stage="kto",
                                           output_dir=str(Path(spec["workdir"]) / "refused"), report_to="none")))
    done = subprocess.run([sys.executable, "-m", "prospect", "train", str(config_file), override],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    return {"exit_code": done.returncode, "message": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}


def child(spec_path: str) -> None:
    """The runs of one device: `gpu` (bf16, QLoRA, fa2, liger last) or `cpu` (the float32 references)."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    runs = []
    if spec["role"] == "cpu":
        runs = [("fp32-sft", dict(stage="sft")), ("fp32-kto", dict(stage="kto"))]
    else:
        bf16 = dict(bf16=True) if torch.cuda.is_available() else {}
        runs = [("bf16-sft", dict(stage="sft", **bf16)), ("bf16-kto", dict(stage="kto", **bf16)),
                ("qlora-kto", dict(stage="kto", quantization_bit=4, **bf16))]
        if torch.cuda.is_available():  # the flash-attn package's kernel, or PyTorch's own varlen one
            runs.append(("fa2-kto", dict(stage="kto", flash_attn="fa2", **bf16)))
        else:
            results["fa2-refused"] = refused(spec, "flash_attn=fa2")
        if torch.cuda.is_available():
            runs.append(("liger-kto", dict(stage="kto", enable_liger_kernel=True, **bf16)))
        else:
            results["liger-refused"] = refused(spec, "enable_liger_kernel=true")
    for name, settings in runs:
        try:
            results[name] = train_once(spec, name, **settings)
        except Exception as err:  # reported as a FAIL line; the other runs go on
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(f"{name}: {json.dumps(results[name])[:300]}", flush=True)
        Path(spec["result"]).write_text(json.dumps(results))
    results["versions"] = {name: bench_gpu.installed_version(name) for name in bench_gpu.VERSIONS_SHOWN + ("bitsandbytes",)}
    Path(spec["result"]).write_text(json.dumps(results))


# --------------------------------------------------------------------------------------------------
# Verdicts


def close(got: list, expected: list, *, relative: float = 0.0, absolute: float = 0.0) -> tuple[bool, float]:
    """(every pair within tolerance, the largest difference: relative if `relative` else absolute)."""
    if not got or len(got) != len(expected):
        return False, float("inf")
    if relative:
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, expected))
        return worst <= relative, worst
    worst = max(abs(a - b) for a, b in zip(got, expected))
    return worst <= absolute, worst


def verdicts(gpu: dict, cpu: dict) -> list[tuple[str, str, str]]:
    """(check, PASS/FAIL/SKIP, figures) for each check of `run`."""
    lines = []

    def failed(name, result):
        return result is None or "error" in result

    def gib(result):
        return f"{result['peak_memory_bytes'] / 2**30:.2f} GiB" if result.get("peak_memory_bytes") else "- (CPU)"

    for stage, tolerance in (("sft", dict(relative=0.02)), ("kto", dict(absolute=0.01))):
        ours, oracle = gpu.get(f"bf16-{stage}"), cpu.get(f"fp32-{stage}")
        if failed(f"bf16-{stage}", ours) or failed(f"fp32-{stage}", oracle):
            lines.append((f"bf16-{stage}", "FAIL", f"gpu: {(ours or {}).get('error')}; cpu: {(oracle or {}).get('error')}"))
            continue
        ok, worst = close(ours["losses"], oracle["losses"], **tolerance)
        figures = (f"attention {ours['attention']} vs {oracle['attention']}; losses {ours['losses']} vs float32 CPU "
                   f"{oracle['losses']} (worst {worst:.2e})")
        if stage == "kto":
            ref_ok, ref_worst = close(ours.get("reference_logps", []), oracle.get("reference_logps", []), relative=0.01)
            ok, figures = ok and ref_ok, figures + f"; reference log-probs worst relative {ref_worst:.2e}"
        lines.append((f"bf16-{stage}", "PASS" if ok else "FAIL", figures + f"; {gib(ours)}; {ours['seconds']:.1f} s"))

    base = gpu.get("bf16-kto") or {}
    for name, check, tolerance in (("qlora-kto", lambda r: r["q_proj"] == "Linear4bit", 0.02),
                                   ("liger-kto", lambda r: "Liger" in r["norm_forward"] and "Liger" in r["mlp_forward"],
                                    0.01),
                                   ("fa2-kto", lambda r: r["attention"] in ("flash_attention_2", "prospect_varlen"),
                                    0.01)):
        result = gpu.get(name)
        if result is None:
            refusal = gpu.get(name.split("-")[0] + "-refused")
            if refusal is not None:
                status = "PASS" if refusal["exit_code"] == 2 else "FAIL"
                lines.append((name, f"SKIP ({status} refusal)", f"exit {refusal['exit_code']}: {refusal['message']}"))
            continue
        if "error" in result or "losses" not in base:
            lines.append((name, "FAIL", result.get("error", "bf16-kto failed")))
            continue
        ok, worst = close(result["losses"], base["losses"], absolute=tolerance)
        applied = check(result)
        lines.append((name, "PASS" if ok and applied else "FAIL",
                       f"attention {result['attention']}, layers {result['q_proj']}, norm {result['norm_forward']}, "
                       f"mlp {result['mlp_forward']}; losses "
                       f"{result['losses']} vs bf16 LoRA {base['losses']} (worst {worst:.2e}); peak {gib(result)} "
                       f"vs {gib(base)}; {result['seconds']:.1f} s"))
    return lines


def spawn(role: str, base: dict, workdir: Path, log, threads: int | None = None) -> tuple[subprocess.Popen, Path]:
    spec = dict(base, role=role, result=str(workdir / f"{role}.result.json"))
    (workdir / f"{role}.spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if role == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen([sys.executable, __file__, "child", str(workdir / f"{role}.spec.json")],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir))
    return process, Path(spec["result"])


def run_all(args) -> None:
    import torch

    started = time.perf_counter()
    assets = Path(args.assets)
    if not (assets / "model" / "tokenizer.json").is_file():
        if not args.tiny:
            raise SystemExit(f"{assets} has no tokenizer: run `python benchmarks/gpu_check.py prepare` first")
        assets = Path(tempfile.mkdtemp(prefix="prospect-gpu-assets-"))
        bench_gpu.copy_assets(assets)
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        raise SystemExit("no CUDA device: this check is for a GPU (use --tiny to check the script on CPU)")
    workdir = Path(args.workdir) if args.workdir else (WORK if not args.tiny else Path(tempfile.mkdtemp()))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    out = Path(args.out) if args.out else workdir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    save_model(model_dir, assets / "model", args.tiny)
    base = dict(model_dir=str(model_dir), data_dir=str(assets / "data"), workdir=str(workdir))
    with open(out / "gpu_check.log", "w") as log:
        cpu_threads = max(1, (os.cpu_count() or 2) - 4) if gpu else None
        cpu_process, cpu_result = spawn("cpu", base, workdir, log, cpu_threads)
        gpu_process, gpu_result = spawn("gpu", base, workdir, log)
        for process, what in ((gpu_process, "GPU runs"), (cpu_process, "CPU runs")):
            try:
                process.wait(timeout=max(30, args.budget * 0.5 - (time.perf_counter() - started)))
            except subprocess.TimeoutExpired:
                process.kill()
                print(f"{what}: stopped at the time budget", flush=True)
    results = {role: json.loads(path.read_text()) if path.is_file() else {} for role, path in
               (("gpu", gpu_result), ("cpu", cpu_result))}
    lines = verdicts(results["gpu"], results["cpu"])
    header = (f"{results['gpu'].get('device', '?')}; model: Qwen2.5-0.5B widths, "
              f"{'2 tiny' if args.tiny else SHAPE['num_hidden_layers']} layers, random; "
              f"{STEPS} steps of {BATCH} kto_en_demo examples; {results['gpu'].get('versions')}")
    text = "\n".join([header] + [f"{verdict:<20} {name:<10} {figures}" for name, verdict, figures in lines])
    print(text, flush=True)
    (out / "gpu_check.json").write_text(json.dumps({"results": results, "verdicts": lines, "text": text}, indent=1))
    left = args.budget - (time.perf_counter() - started)
    if args.bench and left > 120:
        bench = [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "run", "--runs",
                 args.bench_runs, "--steps", "8", "--warmup", "2", "--examples", "64",
                 "--out", str(out / "bench"), "--workdir", str(workdir / "bench")] + (["--tiny"] if args.tiny else [])
        print(f"bench_gpu.py with {left:.0f} s left:", flush=True)
        try:
            subprocess.run(bench, timeout=left - 15, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except subprocess.TimeoutExpired:
            print("bench_gpu.py: stopped at the time budget", flush=True)
    elif args.bench:
        print(f"bench_gpu.py skipped: {left:.0f} s left of the budget", flush=True)


def run_ray(args) -> None:
    """ray-1gpu: the bf16-kto run of `run` again, through Ray Train with one GPU worker."""
    import importlib.util

    import torch

    workdir = Path(args.workdir) if args.workdir else WORK
    out = Path(args.out) if args.out else workdir
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((workdir / "gpu.result.json").read_text()).get("bf16-kto", {})
    if importlib.util.find_spec("ray") is None:
        print("SKIP                 ray-1gpu   ray is not installed")
        return
    os.environ["USE_RAY"] = "1"
    spec = dict(model_dir=str(workdir / "model"), data_dir=str(Path(args.assets) / "data"), workdir=str(workdir))
    settings = dict(stage="kto", ray_num_workers=1, ray_storage_path=str(workdir / "ray"), ray_run_name="ray-1gpu")
    if torch.cuda.is_available():
        settings.update(bf16=True, resources_per_worker={"GPU": 1})
    try:
        import prospect.train
        from prospect.launch import launch

        assert prospect.train  # imported before Ray forks its workers
        launch(run_config(spec, "ray-out", **settings))
        metrics = next((workdir / "ray").rglob("metrics.jsonl"))
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()
                  if json.loads(line).get("split") == "train"]
        ok, worst = close(losses, previous.get("losses", []), absolute=1e-3)
        line = f"{'PASS' if ok else 'FAIL':<20} ray-1gpu   losses {losses} vs bf16-kto {previous.get('losses')} (worst {worst:.2e})"
    except Exception as err:
        line = f"{'FAIL':<20} ray-1gpu   {type(err).__name__}: {str(err)[:400]}"
    print(line, flush=True)
    (out / "gpu_check_ray.txt").write_text(line + "\n")


SHARD_CHECKS = {  # name: the settings added to bf16-kto's, and the loss tolerance against bf16-kto
    # FSDP2 on one process: the shards in CPU memory, gathered layer by layer onto the GPU (autocast as bf16-kto)
    "fsdp-offload": (dict(fsdp="full_shard offload"), 0.01),
    # DeepSpeed computes with bfloat16 weights (adapters included) and float32 master copies, not autocast
    "zero3-offload": (dict(deepspeed=str(REPO / "examples" / "deepspeed" / "ds_z3_offload_config.json")), 0.02),
    "zero2-offload": (dict(deepspeed=str(REPO / "examples" / "deepspeed" / "ds_z2_offload_config.json")), 0.02),
}


def run_shard(args) -> None:
    """fsdp-offload, zero3-offload, zero2-offload: the bf16-kto run of `run` again, sharded on one process with
    the shards (or DeepSpeed's optimizer state) in CPU memory: the same losses, less GPU memory."""
    import importlib.util

    workdir = Path(args.workdir) if args.workdir else WORK
    out = Path(args.out) if args.out else workdir
    out.mkdir(parents=True, exist_ok=True)
    import torch

    previous = json.loads((workdir / "gpu.result.json").read_text()).get("bf16-kto", {})
    spec = dict(model_dir=str(workdir / "model"), data_dir=str(Path(args.assets) / "data"), workdir=str(workdir))
    lines = []
    for name, (settings, tolerance) in SHARD_CHECKS.items():
        if "deepspeed" in settings and importlib.util.find_spec("deepspeed") is None:
            lines.append(f"{'SKIP':<20} {name} deepspeed is not installed (carry .gpu/deepspeed, see the docstring)")
            print(lines[-1], flush=True)
            continue
        try:
            result = train_once(spec, name, stage="kto", bf16=True, **settings)
            ok, worst = close(result["losses"], previous.get("losses", []), absolute=tolerance)
            lines.append(f"{'PASS' if ok else 'FAIL':<20} {name} losses {result['losses']} vs bf16-kto "
                         f"{previous.get('losses')} (worst {worst:.2e}); peak GPU memory "
                         f"{result['peak_memory_bytes'] / 2**30:.2f} GiB vs "
                         f"{previous.get('peak_memory_bytes', 0) / 2**30:.2f} GiB without sharding; "
                         f"{result['seconds']:.1f} s vs {previous.get('seconds', 0):.1f} s")
        except Exception as err:
            from prospect.errors import UserError

            refusal = isinstance(err, UserError) and "offload" in str(err) and not torch.cuda.is_available()
            lines.append(f"{'SKIP (PASS refusal)' if refusal else 'FAIL':<20} {name} {type(err).__name__}: "
                         f"{str(err)[:400]}")
        print(lines[-1], flush=True)
    (out / "gpu_check_shard.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="here, with PyPI: write .gpu/ for the device calls")
    for name in ("run", "ray", "shard"):
        command = sub.add_parser(name, help="the checks (on the GPU machine; --tiny: on CPU)" if name == "run"
                                 else f"the {name} check, after `run` on the same machine")
        command.add_argument("--tiny", action="store_true", help="a 2-layer model on CPU: checks the script")
        command.add_argument("--assets", default=str(ASSETS))
        command.add_argument("--workdir", default=None)
        command.add_argument("--out", default=None)
        command.add_argument("--budget", type=float, default=420, help="seconds for the whole call")
        command.add_argument("--no-bench", dest="bench", action="store_false", help="skip bench_gpu.py's table")
        command.add_argument("--bench-runs", default="prospect-kto,trl-kto-fastest,prospect-sft",
                             help="bench_gpu.py's runs after the checks")
    sub.add_parser("child").add_argument("spec")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare()
    elif args.command == "child":
        child(args.spec)
    elif args.command == "ray":
        run_ray(args)
    elif args.command == "shard":
        run_shard(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
