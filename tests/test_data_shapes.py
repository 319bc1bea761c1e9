"""Per-example numbers the training loop uses, checked on every data shape.

The loop normalises each optimizer step by numbers read from `Examples` (SFT: the step's trained
tokens; KTO: its number of examples, and with pref_ftx each example's trained tokens). Those numbers
must belong to the rows that are actually packed, whatever the split (val_size), the cut (max_samples),
the drops (anywhere, first and last included), the mix of datasets, the micro-batch, the accumulation
and the number of ranks. The oracle counts the packed tensors themselves and the records the test wrote;
it shares no code with `Examples`' bookkeeping.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prospect.config import build_config
from prospect.data.pipeline import prepare_data

WORDS = "apple river stone cloud seven green quiet lamp north bread violin paper ocean tiger".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _records(rng: random.Random, count: int, stage: str, long_at: set[int]) -> list[dict]:
    """Records whose prompts fit any cutoff_len used here (short turns before the last reply), except at
    `long_at`: there the first user turn alone is longer than any cutoff_len used here."""
    records = []
    for index in range(count):
        turns = rng.randint(1, 3)
        messages = []
        for turn in range(turns):
            words = 300 if (index in long_at and turn == 0) else rng.randint(1, 4)
            messages.append({"role": "user", "content": _text(rng, words)})
            last = turn == turns - 1
            messages.append({"role": "assistant", "content": _text(rng, rng.randint(1, 40 if last else 4))})
        record = {"messages": messages}
        if stage == "kto":
            record["label"] = rng.random() < 0.5
        records.append(record)
    return records


ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


@pytest.fixture(scope="module")
def smollm_dir(smollm_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smollm-tokenizer")
    smollm_tokenizer.save_pretrained(str(folder))
    return folder


case = st.fixed_dictionaries({
    "seed": st.integers(0, 10**6),
    "stage": st.sampled_from(["sft", "kto"]),
    "sizes": st.lists(st.integers(2, 24), min_size=1, max_size=2),  # one dataset, or two mixed
    "drop_first": st.booleans(), "drop_last": st.booleans(), "drop_share": st.sampled_from([0.0, 0.1, 0.3]),
    "cutoff_len": st.integers(96, 200),
    "val_size": st.sampled_from([0, 0.25, 0.5, 1, 3]),
    "max_samples": st.sampled_from([None, 3, 10]),
    "micro_batch": st.integers(1, 5), "accumulation": st.integers(1, 3), "world": st.integers(1, 3),
    "keep_start": st.booleans(),  # KTO: the truncation that drops examples whose prompt fills cutoff_len
})


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=case)
def test_step_normalisers_count_the_packed_rows(case, smollm_dir, smollm_tokenizer):
    from prospect.batching import IGNORE_INDEX, Examples, plan_schedule, rank_micro_batches, step_examples

    rng = random.Random(case["seed"])
    stage = case["stage"]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        info, expected_kept = {}, 0
        for number, size in enumerate(case["sizes"]):
            long_at = {i for i in range(size) if rng.random() < case["drop_share"]}
            long_at |= ({0} if case["drop_first"] else set()) | ({size - 1} if case["drop_last"] else set())
            records = _records(rng, size, stage, long_at)
            (data_dir / f"d{number}.json").write_text(json.dumps(records))
            info[f"d{number}"] = {"file_name": f"d{number}.json", **ENTRY}
            used = range(min(size, case["max_samples"] or size))
            dropped = long_at if (stage == "sft" or case["keep_start"]) else set()  # keep_end keeps every one
            expected_kept += sum(1 for i in used if i not in dropped)
        (data_dir / "dataset_info.json").write_text(json.dumps(info))
        val = case["val_size"]
        expected_eval = 0 if val == 0 else int(val) if val >= 1 else max(1, round(val * expected_kept))
        if expected_kept - expected_eval < (2 if stage == "kto" else 1):
            event("skipped: no training set (a user error, tested elsewhere)")
            return
        raw = {"model_name_or_path": str(smollm_dir), "stage": stage, "dataset": ",".join(info),
               "dataset_dir": str(data_dir), "cache_dir": str(Path(tmp) / "cache"), "template": "auto",
               "cutoff_len": case["cutoff_len"], "val_size": case["val_size"], "max_samples": case["max_samples"],
               "per_device_train_batch_size": case["micro_batch"], "seed": case["seed"],
               "gradient_accumulation_steps": case["accumulation"], "num_train_epochs": 2}
        if stage == "kto" and case["keep_start"]:
            raw["truncation_mode"] = "keep_start"
        config = build_config(raw)
        data = prepare_data(config, smollm_tokenizer)

    num_eval = 0 if data.eval is None else len(data.eval)
    assert (len(data.train), num_eval) == (expected_kept - expected_eval, expected_eval), \
        "every kept record reaches a split, no dropped one does"
    event(f"checked: {stage}, {len(case['sizes'])} dataset(s), "
          f"{'split' if num_eval else 'no split'}, {'drops' if expected_kept < sum(case['sizes']) else 'no drop'}")
    examples = Examples(data.train, stage=stage, cutoff_len=config.cutoff_len, seed=config.seed)
    assert len(examples.num_trained_targets) == len(examples.num_tokens) == len(data.train)
    schedule = plan_schedule(len(examples), config, case["world"])
    for step in range(schedule.total_steps):
        indices = step_examples(schedule, config.seed, step)
        packed = [examples.targets(chunk) for rank in range(case["world"])
                  for chunk, weight in rank_micro_batches(indices, schedule, rank) if weight > 0]
        # the loop's normalisers ...
        sft_normaliser = int(examples.num_trained_targets[indices].sum())
        # ... against the rows that were packed, counted on the tensors
        packed_targets = sum(int((batch.targets != IGNORE_INDEX).sum()) for batch in packed)
        assert sft_normaliser == packed_targets, f"step {step}: trained tokens of the step"
        assert sum(batch.num_examples for batch in packed) == len(indices), f"step {step}: examples of the step"
        assert sum(int(batch.input_ids.shape[1]) for batch in packed) == int(examples.num_tokens[indices].sum())
        position = 0
        for rank in range(case["world"]):
            for chunk, weight in rank_micro_batches(indices, schedule, rank):
                if weight == 0:
                    continue
                batch = examples.targets(chunk)
                per_sequence = torch.zeros(batch.num_examples, dtype=torch.long).index_add(
                    0, batch.example_index, (batch.targets != IGNORE_INDEX).long())
                assert per_sequence.tolist() == examples.num_trained_targets[chunk].tolist(), "pref_ftx's divisor"
                position += len(chunk)
        assert position == len(indices)
