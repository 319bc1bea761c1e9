"""Does torch.compile pay for a LoRA training step on this CPU? Eager vs compiled pieces, same batches.

    python benchmarks/compile_probe.py {eager,mlp,layer} [--steps 8]

Runs forward (HiddenStates) + token_logps + backward + AdamW on packed batches of 4 random sequences
of 150-500 tokens (a new length every step, so dynamic shapes matter), SmolLM2-135M fp32 with the
benchmark's LoRA, 2 threads, with: nothing compiled | each layer's MLP compiled (dynamic=True) |
each whole decoder layer compiled (dynamic=True). Prints each step's time and the median of steps 3..N.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_vs_trl as bench  # noqa: E402  (the model and LoRA hyperparameters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["eager", "mlp", "layer"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps; the first two are left out of the median")
    args = parser.parse_args()

    from prospect.allocator import set_allocator_env

    set_allocator_env()  # as `prospect train` does, before torch is imported
    import torch

    from prospect.config import build_config
    from prospect.data.encode import IGNORE_INDEX
    from prospect.losses import token_logps
    from prospect.model import load_trainable_model, model_folder
    from prospect.packing import pack, packed_attention_implementation
    from prospect.forward import HiddenStates

    torch.set_num_threads(2)
    config = build_config(dict(stage="sft", model_name_or_path=model_folder(bench.EMBEDDED), dataset=["unused"],
                               lora_rank=bench.LORA_RANK, lora_alpha=bench.LORA_ALPHA, lora_target=["all"],
                               output_dir="unused"))
    attention = packed_attention_implementation("auto", torch.device("cpu"))
    model = load_trainable_model(config, device=torch.device("cpu"), attn_implementation=attention)
    hidden_model = HiddenStates(model)
    head = hidden_model.causal_lm().get_output_embeddings()
    for layer in hidden_model.causal_lm().get_decoder().layers:
        if args.mode == "mlp":
            layer.mlp.compile(dynamic=True)
        elif args.mode == "layer":
            layer.compile(dynamic=True)  # attention graph-breaks at the per-sequence bounds and runs eagerly
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    generator = torch.Generator().manual_seed(0)  # the same batches in every mode
    step_seconds, losses = [], []
    for step in range(1, args.steps + 1):
        sequences = []
        for length in torch.randint(150, 500, (4,), generator=generator).tolist():
            ids = torch.randint(0, 49000, (length,), generator=generator).tolist()
            sequences.append((ids, [IGNORE_INDEX] * (length // 3) + ids[length // 3:]))  # a third is "prompt"
        batch = pack(sequences)
        start = time.perf_counter()
        per_token = token_logps(hidden_model(**batch.model_inputs()), head, batch.targets)
        loss = -per_token.sum() / batch.num_trained_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
        print(f"{args.mode} step {step}: {step_seconds[-1]:.2f} s, {batch.num_tokens} tokens, loss {losses[-1]:.5f}",
              flush=True)
    print(f"RESULT {args.mode}: first step {step_seconds[0]:.1f} s, median of steps 3..{args.steps} "
          f"{statistics.median(step_seconds[2:]):.3f} s, losses {[round(x, 5) for x in losses]}")


if __name__ == "__main__":
    main()
