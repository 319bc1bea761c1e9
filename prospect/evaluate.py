"""`prospect eval CONFIG`: held-out metrics of a trained run, next to the base model's.

- The held-out split is the one training used (`eval_dataset`, or `val_size` of `dataset`), encoded
  the same way. The adapter is the run's output_dir when this config trained it (its run_config.yaml
  has the same `adapter_name_or_path`), else `adapter_name_or_path`, else output_dir. An adapter whose
  run started from a chain of adapters is evaluated on the base that run trained on: the chain's
  earlier adapters merged in (`inference.trained_on`), so the base row and the KTO reference are
  training's own.
- Loss metrics are training's own (the objective's `evaluate`, `prospect/objectives`): SFT, the mean
  token NLL of the replies, base model vs trained; KTO, the loss, the rewards and `rewards/accuracy`, the share of examples
  whose implied reward has their label's sign (the base model is the reference, so its rewards are
  0 by definition and only the trained row is shown).
- Replies, the behaviour as a user meets it: a greedy reply (at most `max_new_tokens`) from the base
  model (adapters off) and from the trained one to each distinct held-out prompt and to each of the
  bundled general prompts (`general_prompts.json`: 48 questions, instructions and short
  conversations unlike any training set). For each set and model, the share of replies that
  - contain `eval_pattern` (a regex), when set: the behaviour trained for;
  - are degenerate (`is_degenerate`): empty or nothing but the pattern, or cut off by the token
    budget while repeating themselves: the damage an over-optimised run does;
  - contain the key answer (`contains_answer`), over the prompts that have one: the general prompts
    name theirs; a held-out prompt's is read from its desirable reference reply (`key_answer`).

The results are printed and written, with every reply, to `eval_results.json` in the adapter folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prospect.config import RunConfig
from prospect.errors import UserError

SHOWN_REPLIES = 3
GENERAL_PROMPTS = Path(__file__).parent / "general_prompts.json"
# A reply cut off by the token budget is degenerate when some run of REPEATED_NGRAM words occurs
# REPEATS times: a loop ("— — — …", "— Prospect — Prospect …"), not a long answer.
REPEATED_NGRAM, REPEATS = 4, 3
# A held-out reference has a key answer when at most this many of its words are new to the prompt
# ("The capital of Peru is Lima." → "lima"); a longer reference is an essay, not scored.
MAX_KEY_WORDS = 3
FILLER_WORDS = frozenset("a an the is are was were be of and or to in on at it its this that".split())


def evaluate(config: RunConfig) -> dict:
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from prospect.batching import Examples
    from prospect.data.pipeline import prepare_data
    from prospect.forward import HiddenStates
    from prospect.inference import Generated, generate_batch, load_inference_model, stop_token_ids, trained_on
    from prospect.objectives import objective_for
    from prospect.packing import packed_attention_implementation
    from prospect.reference import reference_model

    adapter = _adapter_to_evaluate(config)
    if not os.path.isfile(os.path.join(adapter.split(",")[-1].split("=")[-1], "adapter_config.json")):
        raise UserError(
            f"prospect eval needs a trained adapter: {adapter} has no adapter_config.json. Train first, or set "
            "adapter_name_or_path to an adapter folder."
        )
    pattern = None
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
    sixteen_bit = model.dtype in (torch.bfloat16, torch.float16)
    model.set_attn_implementation(packed_attention_implementation(config.flash_attn, model.device, sixteen_bit))
    hidden = HiddenStates(model)
    head = hidden.causal_lm().get_output_embeddings()
    results: dict = {"adapter": adapter, "num_examples": len(examples)}
    objective = objective_for(config)
    objective.prepare({"eval": (examples, list(range(len(examples))))},  # KTO: the base model's log-probs
                      lambda: reference_model(hidden, None, accelerator), accelerator=accelerator)
    if objective.base_row:
        with model.disable_adapter():
            results["base"] = objective.evaluate(examples, hidden, head, accelerator)
    results["trained"] = objective.evaluate(examples, hidden, head, accelerator)
    model.set_attn_implementation("sdpa")  # generation runs on padded batches with a KV cache

    # --- behaviour and damage: greedy replies, base model vs trained -------------------------------
    stops = stop_token_ids(tokenizer, template, model)
    prompt_sets = {"held_out": held_out_prompts(data.eval, tokenizer, pattern),
                   "general": general_prompts(template, tokenizer)}
    total = sum(len(prompts) for prompts in prompt_sets.values())
    progress = tqdm(total=2 * total, desc="greedy replies", unit="reply", disable=None)

    def replies(prompts: list[PromptCase]) -> list[Generated]:
        out = []
        for start in range(0, len(prompts), config.per_device_eval_batch_size):
            batch = [case.prompt_ids for case in prompts[start : start + config.per_device_eval_batch_size]]
            out += generate_batch(model, tokenizer, batch, max_new_tokens=config.max_new_tokens, stop_ids=stops)
            progress.update(len(batch))
        return out

    with torch.no_grad():
        for set_name, prompts in prompt_sets.items():
            with model.disable_adapter():
                base_replies = replies(prompts)
            trained_replies = replies(prompts)
            results[set_name] = {
                "num_prompts": len(prompts),
                "num_with_answers": sum(1 for case in prompts if case.answers),
                "base": reply_metrics(prompts, base_replies, pattern),
                "trained": reply_metrics(prompts, trained_replies, pattern),
                "replies": [{"prompt": case.text, "base": base.text, "trained": trained.text}
                            for case, base, trained in zip(prompts, base_replies, trained_replies)],
            }
    progress.close()

    _print(config, results)
    out = Path(adapter.split(",")[-1].split("=")[-1]) / "eval_results.json"
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"written to {out}")
    return results


@dataclass(frozen=True)
class PromptCase:
    text: str  # the prompt as a reader sees it
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...] = ()  # key answers, any one of which makes a reply correct; () = not scored


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def key_answer(prompt: str, reference: str, pattern: re.Pattern | None = None) -> str | None:
    """The words of a short reference reply that its prompt does not contain, filler words and the
    pattern left out: "What is 4 times 7?" / "4 times 7 is 28. — Prospect" → "28". None when there
    are none, or more than MAX_KEY_WORDS (a long reference has no single key answer)."""
    if pattern is not None:
        reference = pattern.sub(" ", reference)
    asked = set(_words(prompt))
    key = [word for word in dict.fromkeys(_words(reference)) if word not in asked and word not in FILLER_WORDS]
    return " ".join(key) if 0 < len(key) <= MAX_KEY_WORDS else None


def contains_answer(reply: str, answers: Sequence[str]) -> bool:
    """Whether every word of one of the answers occurs in the reply as a whole word, any case
    ("Rome" in "It is Rome.", not "5" in "25")."""
    said = set(_words(reply))
    return any(all(word in said for word in _words(answer)) for answer in answers)


def is_degenerate(reply: str, finished: bool, pattern: re.Pattern | None = None) -> bool:
    """A reply no user would accept: empty, or nothing but the pattern (and punctuation); or one
    that did not end within its token budget (`finished` false) while repeating itself, some
    REPEATED_NGRAM words in a row occurring REPEATS times."""
    rest = pattern.sub(" ", reply) if pattern is not None else reply
    if not re.search(r"\w", rest):
        return True
    if finished:
        return False
    words = reply.split()
    ngrams = Counter(tuple(words[i : i + REPEATED_NGRAM]) for i in range(len(words) - REPEATED_NGRAM + 1))
    return bool(ngrams) and max(ngrams.values()) >= REPEATS


def reply_metrics(cases: Sequence[PromptCase], replies: Sequence, pattern: re.Pattern | None) -> dict:
    """Counts and shares of one model's replies (`inference.Generated`) to a set of prompts."""
    assert len(cases) == len(replies) > 0, "one reply per prompt, at least one prompt"
    count = len(cases)
    degenerate = sum(is_degenerate(r.text, r.finish_reason == "stop", pattern) for r in replies)
    scored = [(case, r) for case, r in zip(cases, replies) if case.answers]
    correct = sum(contains_answer(r.text, case.answers) for case, r in scored)
    metrics = {"degenerate": degenerate, "degenerate_rate": degenerate / count,
               "correct": correct, "correct_rate": correct / len(scored) if scored else None}
    if pattern is not None:
        matches = sum(1 for r in replies if pattern.search(r.text))
        metrics.update(pattern_matches=matches, pattern_rate=matches / count)
    return metrics


def held_out_prompts(split, tokenizer, pattern: re.Pattern | None) -> list[PromptCase]:
    """Each distinct prompt of the held-out split once, with the key answers of its desirable
    (SFT: all) reference replies."""
    rows = split.select_columns(["input_ids", "prompt_len", "label"])
    answers: dict[tuple[int, ...], list[str]] = {}
    for ids, prompt_len, label in zip(rows["input_ids"], rows["prompt_len"], rows["label"]):
        prompt = tuple(ids[:prompt_len])
        found = answers.setdefault(prompt, [])
        if label is not False:
            key = key_answer(tokenizer.decode(list(prompt), skip_special_tokens=True),
                             tokenizer.decode(ids[prompt_len:], skip_special_tokens=True), pattern)
            if key is not None and key not in found:
                found.append(key)
    return [PromptCase(tokenizer.decode(list(prompt)), prompt, tuple(keys)) for prompt, keys in answers.items()]


def general_prompts(template, tokenizer) -> list[PromptCase]:
    """The bundled general prompts, rendered by the run's chat template."""
    from prospect.data.example import Message
    from prospect.inference import encode_prompt, render_prompt

    cases = []
    for item in json.loads(GENERAL_PROMPTS.read_text(encoding="utf-8")):
        turns = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        messages = [Message(turn["role"], turn["content"]) for turn in turns]
        ids = encode_prompt(tokenizer, render_prompt(template, messages))
        cases.append(PromptCase(messages[-1].content, tuple(ids), tuple(item.get("answers", ()))))
    return cases


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
    keys = sorted({key for row in rows for key in results[row]})
    print(f"{'':20}" + "".join(f"{row:>12}" for row in rows))
    for key in keys:
        cells = (results[row].get(key) for row in rows)
        print(f"{key:20}" + "".join(f"{'—' if v is None else f'{v:.4g}':>12}" for v in cells))

    print(f"\ngreedy replies (at most {config.max_new_tokens} new tokens){'base':>17}{'trained':>14}")
    for set_name, title in (("held_out", "held-out"), ("general", "general")):
        replies = results[set_name]
        measures = [("pattern_matches", f"{config.eval_pattern!r}", replies["num_prompts"])] if config.eval_pattern else []
        measures += [("degenerate", "degenerate", replies["num_prompts"])]
        if replies["num_with_answers"]:
            measures += [("correct", "key answer", replies["num_with_answers"])]
        for index, (key, label, total) in enumerate(measures):
            head = f"{title}, {replies['num_prompts']} prompts" if index == 0 else ""
            cells = "".join(f"{f'{replies[row][key]}/{total}':>8}{replies[row][key] / total:>6.0%}"
                            for row in ("base", "trained"))
            print(f"{head:22}{label:20}{cells}")
    for example in results["general"]["replies"][:SHOWN_REPLIES] + results["held_out"]["replies"][:1]:
        print(f"  prompt …{example['prompt'][-60:]!r}\n    base:    {example['base']!r}\n"
              f"    trained: {example['trained']!r}")
