"""Per-turn KTO labels: a conversation whose rated assistant turns carry `"label"` is the same
training data as those turns written out as separate records, each ending at its rated turn (the
conversation-level format every tool reads). The oracle is that second file, read by the path that
existed before per-turn labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from prospect.cli import main
from prospect.data.formats import load_examples
from prospect.data.registry import resolve_datasets
from test_train import adapter_weights, make_config, max_difference, run

ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
WORDS = "the sign-off matters because people rate replies that end well and dislike rambling ones".split()


def random_conversations(seed: int, count: int) -> list[dict]:
    """Records with 1–5 exchanges, some assistant turns rated, sometimes the record's own label too."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 5)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})
            reply = {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 12)))}
            if rng.random() < 0.5:
                reply["label"] = rng.random() < 0.6
            messages.append(reply)
        record = {"messages": messages}
        last = messages[-1]
        if "label" not in last and (rng.random() < 0.5 or not any("label" in m for m in messages)):
            record["label"] = rng.random() < 0.5  # the record's label rates the last turn
        elif "label" in last and rng.random() < 0.3:
            record["label"] = last["label"]  # both given, agreeing
        records.append(record)
    return records


def as_separate_records(records: list[dict]) -> list[dict]:
    """The oracle's file: one record per rated turn, the conversation up to it, its label as the record's."""
    separate = []
    for record in records:
        messages = record["messages"]
        rated = {i: m["label"] for i, m in enumerate(messages) if "label" in m}
        if "label" in record:
            rated[len(messages) - 1] = record["label"]
        for i, label in sorted(rated.items()):
            separate.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages[: i + 1]],
                             "label": label})
    return separate


def write_dataset(folder, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "dataset_info.json").write_text(json.dumps({"rated": {"file_name": "data.jsonl", **ENTRY}}))


def kto_examples(folder):
    [spec] = resolve_datasets(str(folder), ["rated"])
    examples, skipped = load_examples(spec, str(folder), stage="kto")
    assert not skipped
    return [turn for example in examples for turn in example.rated_turns()]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rated_turns_are_the_separate_records(tmp_path, seed):
    records = random_conversations(seed, 150)
    write_dataset(tmp_path / "turns", records)
    write_dataset(tmp_path / "separate", as_separate_records(records))
    ours, oracle = kto_examples(tmp_path / "turns"), kto_examples(tmp_path / "separate")
    assert len(ours) == len(oracle) > len(records)
    for a, b in zip(ours, oracle):
        assert [(m.role, m.content) for m in a.messages] == [(m.role, m.content) for m in b.messages]
        assert a.label is b.label and a.messages[-1].role == "assistant"
        assert all(m.label is None for m in a.messages), "a rated turn's example carries no other labels"
        assert a.origin.split(" turn ")[0].startswith(str(tmp_path / "turns" / "data.jsonl#"))


def test_training_on_rated_turns_equals_training_on_the_separate_records(tmp_path, tiny_model_dir):
    records = random_conversations(7, 12)
    write_dataset(tmp_path / "turns", records)
    write_dataset(tmp_path / "separate", as_separate_records(records))
    runs = {}
    for name in ("turns", "separate"):
        runs[name] = make_config(tmp_path / f"run-{name}", tiny_model_dir, stage="kto", dataset="rated",
                                 dataset_dir=str(tmp_path / name), max_samples=None, max_steps=4,
                                 per_device_train_batch_size=4)
        results = run(runs[name])
        assert results["num_examples"] == len(as_separate_records(records))
    lines = {name: [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
             for name, config in runs.items()}
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
        ours, oracle = ([line.get(key) for line in lines[name]] for name in ("turns", "separate"))
        assert any(value is not None for value in ours), key
        assert [v is None for v in ours] == [v is None for v in oracle], key
        assert [v for v in ours if v is not None] == pytest.approx([v for v in oracle if v is not None], abs=1e-5), key
    assert max_difference(adapter_weights(runs["turns"].output_dir), adapter_weights(runs["separate"].output_dir)) < 1e-5


def test_data_check_counts_rated_turns_per_conversation(tmp_path, capsys, tiny_model_dir):
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "label": True},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "label": False}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": True},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "label": True},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "label": True},
                      {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}], "label": False},
    ]
    write_dataset(tmp_path / "data", records)
    config = tmp_path / "run.yaml"
    config.write_text(make_config(tmp_path, tiny_model_dir, stage="kto", dataset="rated",
                                  dataset_dir=str(tmp_path / "data")).to_yaml())
    assert main(["data", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rated turns    6 (rated turns per conversation: 1 in 1, 2 in 1, 3 in 1 conversations)" in out, out
    assert "labels         4 desirable, 2 undesirable" in out, out


def test_val_size_holds_out_whole_conversations(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from prospect.data.pipeline import prepare_data

    records = random_conversations(11, 60)
    write_dataset(tmp_path / "data", records)
    config = make_config(tmp_path, tiny_model_dir, stage="kto", dataset="rated", dataset_dir=str(tmp_path / "data"),
                         max_samples=None, val_size=0.2)
    data = prepare_data(config, AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    conversation = lambda origin: origin.split(" turn ")[0]  # noqa: E731
    train, held_out = {conversation(o) for o in data.train["origin"]}, {conversation(o) for o in data.eval["origin"]}
    total = len(data.train) + len(data.eval)
    assert not train & held_out and train | held_out == {f"{tmp_path / 'data' / 'data.jsonl'}#{i}" for i in range(60)}
    assert 0.2 * total <= len(data.eval) <= 0.2 * total + 5, (len(data.eval), total)
