"""`prospect eval CONFIG`: held-out metrics of a trained run, next to the base model's.

- The held-out split is the one training used (`eval_dataset`, or `val_size` of `dataset`), encoded
  the same way. The adapter is the run's output_dir when this config trained it (its run_config.yaml
  has the same `adapter_name_or_path`), else `adapter_name_or_path`, else output_dir. An adapter whose
  run started from a chain of adapters is evaluated on the base that run trained on: the chain's
  earlier adapters merged in (`inference.trained_on`), so the base row and the KTO reference are
  training's own.
- Loss metrics are training's own (`train.evaluate_split`): SFT, the mean token NLL of the replies,
  base model vs trained; KTO, the loss, the rewards and `rewards/accuracy`, the share of examples
  whose implied reward has their label's sign (the base model is the reference, so its rewards are
  0 by definition and only the trained row is shown).
- With `eval_pattern` (a regex), a behaviour check: a greedy reply to each distinct held-out prompt
  from the base model (adapters off) and from the trained one, and the share of replies in which
  the pattern occurs.

The results are printed and written to `eval_results.json` in the adapter folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from prospect.config import RunConfig
from prospect.errors import UserError

SHOWN_REPLIES = 3


def evaluate(config: RunConfig) -> dict:
    import torch
    from accelerate import Accelerator

    from prospect.data.pipeline import prepare_data
    from prospect.inference import generate_batch, load_inference_model, stop_token_ids, trained_on
    from prospect.packing import packed_attention_implementation
    from prospect.train import Examples, HiddenStates, compute_reference_logps, evaluate_split

    adapter = _adapter_to_evaluate(config)
    if not os.path.isfile(os.path.join(adapter.split(",")[-1].split("=")[-1], "adapter_config.json")):
        raise UserError(
            f"prospect eval needs a trained adapter: {adapter} has no adapter_config.json. Train first, or set "
            "adapter_name_or_path to an adapter folder."
        )
    if config.eval_pattern is not None:
        try:
            pattern = re.compile(config.eval_pattern)
        except re.error as err:
            raise UserError(f"eval_pattern: {config.eval_pattern!r} is not a valid regex ({err}).") from None
    base_adapters = trained_on(adapter) if "," not in adapter else []
    if base_adapters:
        print(f"{adapter} was trained from {', '.join(base_adapters)} merged into the base: evaluated on that base")
    model, tokenizer, template = load_inference_model(dataclasses.replace(config, adapter_name_or_path=adapter),
                                                      merged_first=base_adapters)
    data = prepare_data(config, tokenizer)
    if data.eval is None or len(data.eval) == 0:
        raise UserError("prospect eval needs held-out data: set eval_dataset (or val_size) in the config.")
    # seed + 1: the same KL pairing of the eval split as during training
    examples = Examples(data.eval, stage=config.stage, cutoff_len=config.cutoff_len, seed=config.seed + 1)
    accelerator = Accelerator()

    # --- loss metrics, on packed batches like training ---------------------------------------------
    model.set_attn_implementation(packed_attention_implementation(config.flash_attn, model.device)[0])
    hidden = HiddenStates(model)
    head = hidden.causal_lm().get_output_embeddings()
    results: dict = {"adapter": adapter, "num_examples": len(examples)}
    if config.stage == "kto":
        with model.disable_adapter():
            examples.reference_logps, examples.reference_kl_logps, _ = compute_reference_logps(
                examples, hidden, head, accelerator=accelerator, batch_size=config.per_device_eval_batch_size)
        results["trained"] = evaluate_split(config, examples, hidden, head, accelerator)
    else:
        with model.disable_adapter():
            results["base"] = evaluate_split(config, examples, hidden, head, accelerator)
        results["trained"] = evaluate_split(config, examples, hidden, head, accelerator)
    model.set_attn_implementation("sdpa")  # generation runs on padded batches with a KV cache

    # --- behaviour: greedy replies to the held-out prompts ------------------------------------------
    if config.eval_pattern is not None:
        rows = data.eval.select_columns(["input_ids", "prompt_len"])
        prompts = list(dict.fromkeys(tuple(ids[:n]) for ids, n in zip(rows["input_ids"], rows["prompt_len"])))
        stops = stop_token_ids(tokenizer, template, model)

        def replies() -> list[str]:
            texts = []
            for start in range(0, len(prompts), config.per_device_eval_batch_size):
                batch = prompts[start : start + config.per_device_eval_batch_size]
                texts += [g.text for g in generate_batch(model, tokenizer, batch, max_new_tokens=config.max_new_tokens,
                                                         stop_ids=stops)]
            return texts

        with torch.no_grad():
            with model.disable_adapter():
                base_replies = replies()
            trained_replies = replies()
        for name, texts in (("base", base_replies), ("trained", trained_replies)):
            matches = sum(1 for text in texts if pattern.search(text))
            results.setdefault(name, {}).update(pattern_rate=matches / len(texts), pattern_matches=matches)
        results["num_prompts"] = len(prompts)
        results["examples"] = [
            {"prompt": tokenizer.decode(list(prompt)), "base": base, "trained": trained}
            for prompt, base, trained in list(zip(prompts, base_replies, trained_replies))[:SHOWN_REPLIES]
        ]

    _print(config, results)
    out = Path(adapter.split(",")[-1].split("=")[-1]) / "eval_results.json"
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"written to {out}")
    return results


def _adapter_to_evaluate(config: RunConfig) -> str:
    """The run's output_dir when this config trained it (a training config that continued from
    adapter_name_or_path names the starting adapters there, not the result), else
    adapter_name_or_path, else output_dir."""
    from prospect.inference import read_run_config

    trained_here = os.path.isfile(os.path.join(config.output_dir, "adapter_config.json"))
    if not config.adapter_name_or_path:
        return config.output_dir
    if trained_here and read_run_config(config.output_dir).get("adapter_name_or_path") == config.adapter_name_or_path:
        return config.output_dir
    return config.adapter_name_or_path


def _print(config: RunConfig, results: dict) -> None:
    print(f"held-out: {results['num_examples']} examples ({config.stage}), adapter {results['adapter']}")
    rows = [row for row in ("base", "trained") if row in results]
    keys = sorted({key for row in rows for key in results[row] if key != "pattern_matches"})
    print(f"{'':20}" + "".join(f"{row:>12}" for row in rows))
    for key in keys:
        cells = (results[row].get(key) for row in rows)
        print(f"{key:20}" + "".join(f"{'—' if v is None else f'{v:.4g}':>12}" for v in cells))
    if "num_prompts" in results:
        base, trained = results["base"], results["trained"]
        print(f"pattern {config.eval_pattern!r} in greedy replies to {results['num_prompts']} prompts: "
              f"base {base['pattern_matches']} ({base['pattern_rate']:.0%}) → "
              f"trained {trained['pattern_matches']} ({trained['pattern_rate']:.0%})")
        for example in results["examples"]:
            print(f"  prompt …{example['prompt'][-60:]!r}\n    base:    {example['base']!r}\n"
                  f"    trained: {example['trained']!r}")
