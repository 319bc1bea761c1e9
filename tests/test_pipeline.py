"""`prospect.data.pipeline.prepare_data`: cache, workers, mixing, max_samples, val_size, drops,
and every reference dataset of ../shared/data encoded with the Qwen2.5 tokenizer.

Every test points `cache_dir` into tmp_path, so nothing is read from or written to ~/.cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prospect.data.pipeline as pipeline
from conftest import DATA_DIR
from prospect.config import build_config
from prospect.data.encode import IGNORE_INDEX, DropReason
from prospect.data.pipeline import prepare_data
from prospect.errors import UserError

SHAREGPT_ENTRY = {"formatting": "sharegpt"}
KTO_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "kto_tag": "label"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}


def conversation(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Question number {i}: what is {i} + {i}?"},
                              {"from": "gpt", "value": f"{i} + {i} = {2 * i}."}]}


def alpaca(i: int) -> dict:
    return {"instruction": f"Say the number {i} in words.", "input": "", "output": f"Number {i}."}


def write_dataset(folder: Path, name: str, records: list, entry: dict | None = None,
                  file_name: str | None = None) -> str:
    """Write records to folder/<file_name> and register them under `name` in dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    file_name = file_name or f"{name}.json"
    (folder / file_name).write_text(json.dumps(records), encoding="utf-8")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info[name] = {"file_name": file_name, **(entry or {})}
    info_path.write_text(json.dumps(info))
    return str(folder / file_name)


def make_config(tmp_path: Path, **overrides):
    raw = {
        "model_name_or_path": "unused-by-prepare-data",
        "template": "qwen",
        "dataset": "d",
        "dataset_dir": str(tmp_path / "data"),
        "cache_dir": str(tmp_path / "cache"),
        "cutoff_len": 256,
    }
    raw.update(overrides)
    return build_config(raw)


@pytest.fixture
def encode_calls(monkeypatch):
    """Counts `encode_example` calls made in this process (the map without workers)."""
    calls = []
    original = pipeline.encode_example

    def counting(example, *args, **kwargs):
        calls.append(example.origin)
        return original(example, *args, **kwargs)

    monkeypatch.setattr(pipeline, "encode_example", counting)
    return calls


def cache_folders(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "tokenized"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def rows(dataset) -> dict:
    return dataset.to_dict()


# ----------------------------------------------------------------------------------------------
# The tokenized cache


def test_cache_is_reused_and_overwrite_cache_rebuilds(tmp_path, qwen_tokenizer, encode_calls):
    write_dataset(tmp_path / "data", "d", [conversation(i) for i in range(6)], SHAREGPT_ENTRY)
    config = make_config(tmp_path)

    first = prepare_data(config, qwen_tokenizer)
    assert len(encode_calls) == 6
    assert len(cache_folders(tmp_path)) == 1
    assert first.reports[0].num_kept == 6

    encode_calls.clear()
    second = prepare_data(make_config(tmp_path), qwen_tokenizer)
    assert encode_calls == []  # nothing re-encoded: read from the cache
    assert rows(second.train) == rows(first.train)
    assert second.reports[0].__dict__ == first.reports[0].__dict__

    rebuilt = prepare_data(make_config(tmp_path, overwrite_cache=True), qwen_tokenizer)
    assert len(encode_calls) == 6
    assert len(cache_folders(tmp_path)) == 1  # replaced, not duplicated
    assert rows(rebuilt.train) == rows(first.train)


@pytest.mark.parametrize("change", [{"cutoff_len": 128}, {"template": "chatml"}, {"stage": "kto"}])
def test_what_shapes_the_tokens_changes_the_cache_key(tmp_path, qwen_tokenizer, encode_calls, change):
    records = [{**conversation(i), "label": i % 2 == 0} for i in range(4)]
    write_dataset(tmp_path / "data", "d", records,
                  {"formatting": "sharegpt", "columns": {"messages": "conversations", "kto_tag": "label"}})
    prepare_data(make_config(tmp_path), qwen_tokenizer)
    [first_key] = cache_folders(tmp_path)

    encode_calls.clear()
    changed = prepare_data(make_config(tmp_path, **change), qwen_tokenizer)
    assert len(encode_calls) == 4  # encoded again, not served from the other key's cache
    folders = cache_folders(tmp_path)
    assert len(folders) == 2 and first_key in folders
    if "template" in change:  # chatml has no default system prompt: the ids really differ
        assert rows(changed.train)["input_ids"] != rows(prepare_data(make_config(tmp_path), qwen_tokenizer).train)[
            "input_ids"]


def test_editing_the_data_file_invalidates_the_cache(tmp_path, qwen_tokenizer, encode_calls):
    write_dataset(tmp_path / "data", "d", [conversation(i) for i in range(3)], SHAREGPT_ENTRY)
    prepare_data(make_config(tmp_path), qwen_tokenizer)
    write_dataset(tmp_path / "data", "d", [conversation(i) for i in range(5)], SHAREGPT_ENTRY)
    encode_calls.clear()
    data = prepare_data(make_config(tmp_path), qwen_tokenizer)
    assert len(encode_calls) == 5 and len(data.train) == 5


def test_two_workers_give_exactly_the_rows_of_one(tmp_path, qwen_tokenizer, encode_calls):
    records = [conversation(i) for i in range(24)]
    records[5]["conversations"][0]["value"] = "word " * 400  # dropped at cutoff_len 64
    write_dataset(tmp_path / "data", "d", records, SHAREGPT_ENTRY)
    one = prepare_data(make_config(tmp_path, cutoff_len=64, cache_dir=str(tmp_path / "c1"),
                                   preprocessing_num_workers=1), qwen_tokenizer)
    assert len(encode_calls) == 24
    encode_calls.clear()
    two = prepare_data(make_config(tmp_path, cutoff_len=64, cache_dir=str(tmp_path / "c2"),
                                   preprocessing_num_workers=2), qwen_tokenizer)
    assert encode_calls == []  # the encoding ran in the worker processes, not here
    assert len(one.train) == 23
    assert rows(two.train) == rows(one.train)
    assert two.reports[0].__dict__ == one.reports[0].__dict__


# ----------------------------------------------------------------------------------------------
# Mixing, max_samples, val_size


def test_two_datasets_are_mixed_in_order(tmp_path, qwen_tokenizer):
    a = write_dataset(tmp_path / "data", "a", [conversation(i) for i in range(5)], SHAREGPT_ENTRY)
    b = write_dataset(tmp_path / "data", "b", [alpaca(i) for i in range(7)])
    data = prepare_data(make_config(tmp_path, dataset="a,b"), qwen_tokenizer)
    assert len(data.train) == 5 + 7
    assert data.train["origin"] == [f"{a}#{i}" for i in range(5)] + [f"{b}#{i}" for i in range(7)]
    assert [(r.name, r.num_kept) for r in data.reports] == [("a", 5), ("b", 7)]
    assert data.eval is None


def test_max_samples_cuts_each_dataset(tmp_path, qwen_tokenizer):
    a = write_dataset(tmp_path / "data", "a", [conversation(i) for i in range(5)], SHAREGPT_ENTRY)
    b = write_dataset(tmp_path / "data", "b", [alpaca(i) for i in range(7)])
    data = prepare_data(make_config(tmp_path, dataset="a,b", max_samples=3), qwen_tokenizer)
    assert data.train["origin"] == [f"{a}#{i}" for i in range(3)] + [f"{b}#{i}" for i in range(3)]
    assert [(r.num_records, r.num_over_max_samples, r.num_kept) for r in data.reports] == [(5, 2, 3), (7, 4, 3)]


def test_val_size_fraction_splits_deterministically_by_seed(tmp_path, qwen_tokenizer):
    path = write_dataset(tmp_path / "data", "d", [conversation(i) for i in range(20)], SHAREGPT_ENTRY)
    everything = {f"{path}#{i}" for i in range(20)}

    first = prepare_data(make_config(tmp_path, val_size=0.25), qwen_tokenizer)
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert set(first.train["origin"]) | set(first.eval["origin"]) == everything
    assert not set(first.train["origin"]) & set(first.eval["origin"])

    again = prepare_data(make_config(tmp_path, val_size=0.25), qwen_tokenizer)
    assert again.eval["origin"] == first.eval["origin"] and again.train["origin"] == first.train["origin"]
    assert rows(again.eval) == rows(first.eval)

    other_seed = prepare_data(make_config(tmp_path, val_size=0.25, seed=7), qwen_tokenizer)
    assert len(other_seed.eval) == 5
    assert set(other_seed.eval["origin"]) != set(first.eval["origin"])


def test_val_size_integer_is_a_number_of_examples(tmp_path, qwen_tokenizer):
    write_dataset(tmp_path / "data", "d", [conversation(i) for i in range(20)], SHAREGPT_ENTRY)
    data = prepare_data(make_config(tmp_path, val_size=3), qwen_tokenizer)
    assert (len(data.train), len(data.eval)) == (17, 3)
    same = prepare_data(make_config(tmp_path, val_size=3), qwen_tokenizer)
    assert same.eval["origin"] == data.eval["origin"]
    with pytest.raises(UserError, match=r"val_size: 20.0 leaves no training examples"):
        prepare_data(make_config(tmp_path, val_size=20), qwen_tokenizer)


# ----------------------------------------------------------------------------------------------
# Examples without a trained token within cutoff_len


def test_example_without_trained_token_is_dropped_and_counted(tmp_path, qwen_tokenizer):
    records = [conversation(0), conversation(1), conversation(2)]
    records[1]["conversations"][0]["value"] = "a very long question " * 40
    path = write_dataset(tmp_path / "data", "d", records, SHAREGPT_ENTRY)
    data = prepare_data(make_config(tmp_path, cutoff_len=64), qwen_tokenizer)
    report = data.reports[0]
    assert data.train["origin"] == [f"{path}#0", f"{path}#2"]
    assert report.dropped == {DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF.value: 1}
    assert (report.num_records, report.num_kept, report.num_truncated) == (3, 2, 0)
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in data.train["labels"])
    assert report.token_lengths == [len(ids) for ids in data.train["input_ids"]]  # none cut
    # the same count comes back from the cache
    assert prepare_data(make_config(tmp_path, cutoff_len=64), qwen_tokenizer).reports[0].dropped == report.dropped


def test_truncated_example_is_kept_cut_at_cutoff_len(tmp_path, qwen_tokenizer):
    records = [conversation(0), conversation(1)]
    records[1]["conversations"][1]["value"] = "a very long answer " * 40
    write_dataset(tmp_path / "data", "d", records, SHAREGPT_ENTRY)
    data = prepare_data(make_config(tmp_path, cutoff_len=64), qwen_tokenizer)
    report = data.reports[0]
    assert report.num_kept == 2 and report.dropped == {} and report.num_truncated == 1
    assert len(data.train[0]["input_ids"]) == report.token_lengths[0] < 64
    assert len(data.train[1]["input_ids"]) == 64 and report.token_lengths[1] > 64
    assert report.num_trained_tokens == sum(
        sum(t != IGNORE_INDEX for t in labels) for labels in data.train["labels"])


# ----------------------------------------------------------------------------------------------
# The reference datasets of ../shared/data, encoded with the Qwen2.5 tokenizer (template qwen)

# name -> (stage, max_samples, cutoff_len, examples expected after encoding). cutoff_len is long
# enough to keep every example: at 2048, 3 kto_en_demo prompts (2616, 2616 and 3502 tokens) and
# glaive_toolcall_en_demo#243 (a 11561-token first user turn) leave no trained token and are dropped.
REFERENCE = {
    "kto_en_demo": ("kto", None, 4096, 300),  # complete: 150 desirable + 150 undesirable
    "glaive_toolcall_en_demo": ("sft", None, 12288, 300),
    "identity": ("sft", None, 2048, 91),
    "alpaca_en_demo": ("sft", 200, 2048, 200),  # 999 records; 200 keep the test fast
}

needs_shared = pytest.mark.skipif(not (DATA_DIR / "dataset_info.json").is_file(),
                                  reason="reference data (../shared/data) not present")


@needs_shared
def test_reference_list_covers_every_local_dataset_in_a_supported_format():
    """Every entry of the reference dataset_info.json whose file is here, except pairwise data."""
    info = json.loads((DATA_DIR / "dataset_info.json").read_text())
    local = {name for name, entry in info.items()
             if "file_name" in entry and (DATA_DIR / entry["file_name"]).exists()}
    unsupported = {name for name in local if info[name].get("ranking")}
    assert unsupported == {"dpo_en_demo"}
    assert local - unsupported == set(REFERENCE)


@needs_shared
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_dataset_encodes(tmp_path, qwen_tokenizer, name):
    stage, max_samples, cutoff_len, expected = REFERENCE[name]
    config = build_config({
        "model_name_or_path": "unused", "template": "qwen", "stage": stage, "dataset": name,
        "dataset_dir": str(DATA_DIR), "cache_dir": str(tmp_path / "cache"), "cutoff_len": cutoff_len,
        "max_samples": max_samples,
    })
    data = prepare_data(config, qwen_tokenizer)
    [report] = data.reports
    assert report.dropped == {} and report.skipped == []
    assert len(data.train) == report.num_kept == expected
    for ids, labels, prompt_len in zip(data.train["input_ids"], data.train["labels"], data.train["prompt_len"]):
        assert len(ids) == len(labels) <= cutoff_len
        assert labels[prompt_len] != IGNORE_INDEX and all(t == IGNORE_INDEX for t in labels[:prompt_len])
        if stage == "kto":  # the text ends right after the completion's end-of-turn token
            assert labels[-1] == ids[-1] == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert report.num_trained_tokens == sum(sum(t != IGNORE_INDEX for t in row) for row in data.train["labels"])

    if stage == "kto":
        labels = list(data.train["label"])
        assert (labels.count(True), labels.count(False)) == (150, 150)
        assert (report.num_desirable, report.num_undesirable) == (150, 150)
    else:
        assert set(data.train["label"]) == {None}
    if name == "glaive_toolcall_en_demo":
        raw = json.loads((DATA_DIR / f"{name}.json").read_text())
        with_tools = sum(json.loads(r["tools"]) != [] for r in raw)
        with_calls = sum(any(t["from"] == "function_call" for t in r["conversations"]) for r in raw)
        texts = qwen_tokenizer.batch_decode(list(data.train["input_ids"]))
        trained = [qwen_tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in data.train["labels"]]
        assert sum("<tools>" in text for text in texts) == with_tools == 191
        assert sum("<tool_call>" in text for text in trained) == with_calls > 0
