"""The feedback loop, end to end, on the embedded model: serve it, let its users rate replies, train KTO
on exactly those ratings, and measure what changed.

    python examples/feedback_loop.py                 # about 9 minutes on 2 CPU cores
    python examples/feedback_loop.py --samples 2 --out saves/feedback-loop

1. `prospect serve` the base SmolLM2-135M-Instruct with `feedback_dir` (sampling at temperature 1).
2. A scripted rater asks every distinct question of the bundled signoff_kto data `--samples` times
   through the OpenAI API and rates each reply through `POST /v1/feedback` by one fixed rule a person
   could apply: thumbs up when the reply is a single sentence (`ONE_SENTENCE`), thumbs down otherwise.
3. `prospect train` KTO on the feedback folder as the server wrote it (`dataset: feedback`), with the
   main job's settings and the desirable weight the label balance asks for.
4. `prospect eval` on the 40 held-out prompts of signoff_eval (never rated; their reference answers
   without the sign-off) and the 48 general prompts: degenerate replies and key answers, base vs
   trained; the script counts the single-sentence replies among eval's greedy replies (eval's own
   `eval_pattern` is for a marker the behaviour adds, like a sign-off, not for a form of the whole reply).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
# The rater's rule, and eval's pattern: one sentence, ending the reply (no other . ! ? before the end).
ONE_SENTENCE = r"^[^.!?\n]+[.!?]\s*$"


def start_server(config_file: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "prospect", "serve", str(config_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        print("  serve:", line.rstrip(), flush=True)
        found = re.search(r"on (http://\S+/v1)", line)
        if found:  # keep reading its output, so that a full pipe never stops the server
            threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
            return server, found.group(1)
    raise SystemExit("prospect serve stopped before it listened")


def questions() -> list[str]:
    records = json.loads((EXAMPLES / "data" / "signoff_kto.json").read_text())
    return list(dict.fromkeys(record["messages"][0]["content"] for record in records))


def rate_replies(base_url: str, prompts: list[str]) -> dict:
    import httpx

    pattern = re.compile(ONE_SENTENCE)
    model = httpx.get(f"{base_url}/models", timeout=60).json()["data"][0]["id"]  # the base model

    def ask_and_rate(prompt: str) -> bool:
        reply = httpx.post(f"{base_url}/chat/completions", timeout=600, json={
            "model": model, "messages": [{"role": "user", "content": prompt}]}).json()
        text = reply["choices"][0]["message"]["content"] or ""
        label = bool(pattern.search(text))
        rated = httpx.post(f"{base_url}/feedback", json={"id": reply["id"], "label": label}, timeout=60)
        rated.raise_for_status()
        return label

    with ThreadPoolExecutor(max_workers=48) as pool:  # the server batches them
        labels = list(pool.map(ask_and_rate, prompts))
    return {"replies": len(labels), "thumbs_up": sum(labels), "thumbs_down": len(labels) - sum(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="saves/feedback-loop")
    parser.add_argument("--samples", type=int, default=3, help="replies rated per question (123 questions)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base model (a test uses a tiny one)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    feedback_dir = out / "feedback"
    if feedback_dir.exists():
        raise SystemExit(f"{feedback_dir} exists: give another --out (ratings are never overwritten)")
    out.mkdir(parents=True, exist_ok=True)

    serve_config = out / "serve.yaml"
    serve_config.write_text(json.dumps({"model_name_or_path": args.model, "template": "auto",
                                        "port": 0, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 48,
                                        "serve_batch_size": 48, "feedback_dir": str(feedback_dir)}))
    print("1. serving the base model", flush=True)
    server, base_url = start_server(serve_config)
    try:
        print(f"2. rating {args.samples} replies to each of {len(questions())} questions", flush=True)
        counts = rate_replies(base_url, questions() * args.samples)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    print(f"   {counts}; {time.perf_counter() - started:.0f} s so far", flush=True)

    # The KTO paper's balance: λD·nD ≈ λU·nU (`prospect data check` prints the same advice).
    chosen_weight = max(1.0, math.ceil(100 * counts["thumbs_down"] / max(1, counts["thumbs_up"])) / 100)
    print(f"3. training KTO on the ratings (kto_chosen_weight {chosen_weight})", flush=True)
    common = [f"model_name_or_path={args.model}", f"output_dir={out / 'adapter'}", "eval_pattern=null"]
    subprocess.run([sys.executable, "-m", "prospect", "train", str(EXAMPLES / "kto_lora.yaml"), *common,
                    "dataset=feedback", f"dataset_dir={feedback_dir}", f"kto_chosen_weight={chosen_weight}",
                    f"num_train_epochs={args.epochs}", "eval_dataset=[]", "eval_steps=null"], check=True)
    print("4. evaluating base vs trained on held-out prompts", flush=True)
    held_out = held_out_dataset(out / "held_out")
    subprocess.run([sys.executable, "-m", "prospect", "eval", str(EXAMPLES / "kto_lora.yaml"), *common,
                    f"adapter_name_or_path={out / 'adapter'}", f"dataset_dir={held_out}", "dataset=held_out",
                    "eval_dataset=held_out"], check=True)
    results = json.loads((out / "adapter" / "eval_results.json").read_text())
    summary = {"ratings": counts, "kto_chosen_weight": chosen_weight, "minutes": (time.perf_counter() - started) / 60}
    pattern = re.compile(ONE_SENTENCE)
    for set_name in ("held_out", "general"):
        replies, measured = results[set_name]["replies"], results[set_name]
        summary[set_name] = {"prompts": measured["num_prompts"], "with_answers": measured["num_with_answers"]} | {
            side: {"one_sentence": sum(bool(pattern.search(r[side])) for r in replies),
                   "degenerate": measured[side]["degenerate"], "correct": measured[side]["correct"]}
            for side in ("base", "trained")}
    (out / "loop_results.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def held_out_dataset(folder: Path) -> Path:
    """signoff_eval's 40 prompts (never rated) with their reference answers, sign-off removed: the
    key answers eval scores are the facts ("111"), not the demo's sign-off."""
    folder.mkdir(parents=True, exist_ok=True)
    records = json.loads((EXAMPLES / "data" / "signoff_eval.json").read_text())
    for record in records:
        for message in record["messages"]:
            message["content"] = message["content"].replace(" — Prospect", "")
    (folder / "held_out.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    entry = json.loads((EXAMPLES / "data" / "dataset_info.json").read_text())["signoff_eval"]
    (folder / "dataset_info.json").write_text(json.dumps({"held_out": dict(entry, file_name="held_out.json")}))
    return folder


if __name__ == "__main__":
    main()
