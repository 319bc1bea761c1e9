"""python benchmarks/compile_probe.py {eager,mlp,layer,norms} [steps]

Does torch.compile pay for a LoRA training step on this CPU? Eager vs compiled pieces, same batches.

Runs forward (HiddenStates) + token_logps + backward on packed batches of 4 random sequences with
lengths like the KTO benchmark's (varying every step, so dynamic shapes matter), for:
  eager | mlp (each layer's MLP compiled, dynamic=True) | layer (each decoder layer compiled)
"""
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prospect.config import build_config
from prospect.losses import token_logps
from prospect.model import load_trainable_model, model_folder
from prospect.packing import pack, packed_attention_implementation
from prospect.train import HiddenStates

torch.set_num_threads(2)
mode = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
config = build_config(dict(stage="sft", model_name_or_path=model_folder("smollm2-135m-instruct"), dataset=["x"],
                           lora_rank=8, lora_alpha=16, lora_target=["all"], output_dir="unused"))
attention, _ = packed_attention_implementation("auto", torch.device("cpu"))
model = load_trainable_model(config, device=torch.device("cpu"), attn_implementation=attention)
hidden_model = HiddenStates(model)
head = hidden_model.causal_lm().get_output_embeddings()
layers = hidden_model.causal_lm().get_decoder().layers
if mode == "mlp":
    for layer in layers:
        layer.mlp.compile(dynamic=True)
elif mode == "layer":
    for layer in layers:
        layer.compile(dynamic=True)
elif mode == "norms":
    for layer in layers:
        layer.mlp.compile(dynamic=True)
        layer.input_layernorm.compile(dynamic=True)
        layer.post_attention_layernorm.compile(dynamic=True)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
generator = torch.Generator().manual_seed(0)
times, losses = [], []
for step in range(steps):
    lengths = torch.randint(150, 500, (4,), generator=generator).tolist()
    sequences = []
    for n in lengths:
        ids = torch.randint(0, 49000, (n,), generator=generator).tolist()
        sequences.append((ids, [-100] * (n // 3) + ids[n // 3:]))
    batch = pack(sequences)
    start = time.perf_counter()
    hidden = hidden_model(**batch.model_inputs())
    per_token = token_logps(hidden, head, batch.targets)
    loss = -per_token.sum() / batch.num_trained_tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
    losses.append(float(loss))
    print(f"{mode} step {step}: {times[-1]:.2f} s, {sum(lengths)} tokens, loss {losses[-1]:.5f}", flush=True)
print(f"RESULT {mode}: first {times[0]:.1f} s, median of steps 2.. {statistics.median(times[2:]):.3f} s, "
      f"losses {[round(x, 5) for x in losses]}")
