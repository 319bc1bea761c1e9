"""Per-turn KTO labels: a conversation whose rated assistant turns carry `"label"` is the same
training data as those turns written out as separate records, each ending at its rated turn (the
conversation-level format every tool reads). The oracle is that second file, read by the path that
existed before per-turn labels."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from prospect.cli import main
from prospect.data.example import Example, Message, fold_conversations
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


@pytest.mark.parametrize("seed", range(40))
def test_folding_the_separate_records_gives_back_the_conversations(tmp_path, seed):
    """Feedback arrives as one record per rated reply; folded, they are the conversations they came from."""
    records = random_conversations(seed, 30)
    separate = as_separate_records(records)
    rng = random.Random(seed)
    duplicates = rng.sample(range(len(separate)), 3)  # a reply rated twice stays a record of its own
    separate += [separate[k] for k in duplicates]
    write_dataset(tmp_path / "turns", records)
    write_dataset(tmp_path / "separate", separate)
    [spec] = resolve_datasets(str(tmp_path / "separate"), ["rated"])
    examples, _ = load_examples(spec, str(tmp_path / "separate"), stage="kto")
    folded, num_folded = fold_conversations(examples)
    assert num_folded == len(separate) - len(records) - len(duplicates)
    key = lambda turn: ([(m.role, m.content) for m in turn.messages], turn.label)  # noqa: E731
    ours = [key(turn) for example in folded for turn in example.rated_turns()]
    expected = [key(turn) for turn in kto_examples(tmp_path / "turns")] + [
        key(Example([Message(m["role"], m["content"]) for m in separate[k]["messages"]], label=separate[k]["label"]))
        for k in duplicates]
    assert ours == expected


def training_lines(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("micro_batch_size", [None, 4])  # one micro-batch (prompt cache) / accumulation (KL pairs)
def test_rated_turns_in_one_forward_equal_the_separate_records(tmp_path, tiny_model_dir, monkeypatch,
                                                               micro_batch_size):
    """The oracle: the turns written as separate records, read and trained by the path that existed before
    (each example a sequence of its own: folding off). Each optimizer step holds every example, so the
    two runs' steps see the same examples whatever their order; the rated turns' run computes each
    conversation once."""
    import prospect.data.pipeline

    records = random_conversations(7, 12)
    separate = as_separate_records(records)
    write_dataset(tmp_path / "turns", records)
    write_dataset(tmp_path / "separate", separate)
    runs, results = {}, {}
    for name in ("turns", "separate"):
        if name == "separate":
            monkeypatch.setattr(prospect.data.pipeline, "fold_conversations", lambda examples: (examples, 0))
        batch = micro_batch_size or len(separate)
        runs[name] = make_config(tmp_path / f"run-{name}", tiny_model_dir, stage="kto", dataset="rated",
                                 dataset_dir=str(tmp_path / name), max_samples=None, max_steps=3,
                                 per_device_train_batch_size=batch, logging_steps=1,
                                 gradient_accumulation_steps=-(-len(separate) // batch), learning_rate=5e-3)
        results[name] = run(runs[name])
        assert results[name]["num_examples"] == len(separate)
    lines = {name: training_lines(config) for name, config in runs.items()}
    for key in ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"):
        ours, oracle = ([line.get(key) for line in lines[name]] for name in ("turns", "separate"))
        assert all(value is not None for value in ours), key
        assert ours == pytest.approx(oracle, abs=1e-5), key
    assert lines["turns"][-1]["loss"] != pytest.approx(lines["turns"][0]["loss"], abs=1e-3), "the runs must train"
    assert max_difference(adapter_weights(runs["turns"].output_dir), adapter_weights(runs["separate"].output_dir)) < 1e-5
    # the saving: the rated turns' run computes every conversation once, not once per rated turn
    conversation_tokens, prefix_tokens = (results[name]["num_tokens"] for name in ("turns", "separate"))
    assert conversation_tokens < 0.8 * prefix_tokens, (conversation_tokens, prefix_tokens)


def test_a_conversations_rated_turns_share_one_sequence(tmp_path, tiny_model_dir):
    """Packed log-probs of rated turns sharing their conversation's sequence equal those of each turn packed
    on its own (the forward and the prompt cache of the KL pass), for 60 seeded batches."""
    from transformers import AutoTokenizer

    from prospect.batching import Examples
    from prospect.data.pipeline import prepare_data
    from prospect.forward import HiddenStates, sequence_logps
    from prospect.model import load_trainable_model
    from prospect.packing import pack, register_packed_attention

    records = random_conversations(5, 40)
    write_dataset(tmp_path / "data", records)
    config = make_config(tmp_path, tiny_model_dir, stage="kto", dataset="rated", dataset_dir=str(tmp_path / "data"),
                         max_samples=None)
    data = prepare_data(config, AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    examples = Examples(data.train, stage="kto", cutoff_len=config.cutoff_len, seed=0)
    register_packed_attention()
    model = load_trainable_model(config, device=torch.device("cpu"), attn_implementation="prospect_packed")
    hidden_model = HiddenStates(model).eval()
    head = hidden_model.causal_lm().get_output_embeddings()
    rng = random.Random(0)
    shared_some = 0
    for _ in range(60):
        start = rng.randrange(len(examples) - 8)
        indices = list(range(start, start + rng.randint(2, 8)))
        rng.shuffle(indices)
        rows = examples.dataset[indices]
        alone = pack(list(zip(rows["input_ids"], rows["labels"])))
        shared = examples.targets(indices)
        conversations = {examples.conversations[i] for i in indices}
        assert shared.cu_seq_lens.numel() - 1 == len(conversations), "each conversation is one sequence"
        shared_some += shared.num_tokens < alone.num_tokens
        assert shared.num_trained_tokens == alone.num_trained_tokens
        with torch.no_grad():
            expected = sequence_logps(hidden_model, head, alone, "cpu")[0]
            cache = examples.prompt_cache(indices, hidden_model, shared)
            got = sequence_logps(hidden_model, head, shared, "cpu", cache)[0]
            cache.extend()
            kl = sequence_logps(hidden_model, head, examples.kl_continuations(indices), "cpu", cache)[0]
            expected_kl = sequence_logps(hidden_model, head, examples.kl_pairs(indices), "cpu")[0]
        # sums of ~100 in float32, added in another order: 1e-5 plus an ulp or two
        assert torch.allclose(got, expected, atol=1e-5, rtol=2e-7), (got, expected)
        assert torch.allclose(kl, expected_kl, atol=1e-4, rtol=0), (kl, expected_kl)
    assert shared_some >= 40, "most batches must hold several rated turns of one conversation"


def data_check(tmp_path, tiny_model_dir, records: list[dict], capsys) -> str:
    """What `prospect data check` prints for a KTO run on `records`."""
    write_dataset(tmp_path / "data", records)
    config = tmp_path / "run.yaml"
    config.write_text(make_config(tmp_path, tiny_model_dir, stage="kto", dataset="rated",
                                  dataset_dir=str(tmp_path / "data")).to_yaml())
    assert main(["data", "check", str(config)]) == 0
    return capsys.readouterr().out


def test_data_check_counts_rated_turns_per_conversation(tmp_path, capsys, tiny_model_dir):
    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "label": True},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "label": False}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "label": True},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "label": True},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "label": True},
                      {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}], "label": False},
    ]
    out = data_check(tmp_path, tiny_model_dir, records, capsys)
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


@pytest.mark.parametrize("seed", range(100))
def test_the_data_order_keeps_a_conversations_turns_together(seed):
    """Conversations are shuffled whole; with every example alone the order is the one runs had before."""
    from prospect.batching import Schedule, epoch_order

    rng = random.Random(seed)
    sizes = tuple(rng.choice([1, 1, 1, 2, 3, 5]) for _ in range(rng.randint(1, 60)))
    n = sum(sizes)
    order = epoch_order(Schedule(n, 4, 1, 1, 1, 1, sizes), seed, epoch=seed % 3)
    assert sorted(order) == list(range(n))
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    for start, size in zip(starts, sizes):
        at = order.index(start)
        assert order[at : at + size] == list(range(start, start + size)), "a conversation's turns, in order, together"
    alone = list(range(n))
    random.Random(f"{seed}-{seed % 3}").shuffle(alone)
    assert epoch_order(Schedule(n, 4, 1, 1, 1, 1), seed, seed % 3) == alone


def test_feedback_on_two_replies_of_a_conversation_is_one_conversation_rated_twice(tmp_path, capsys, tiny_model_dir):
    """What `prospect serve` writes for two rated replies of one chat: two records, folded into one."""
    first = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello.", "label": True}]
    second = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Well, well.", "label": False}]
    other = [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "Hi.", "label": True}]
    out = data_check(tmp_path, tiny_model_dir, [{"messages": first}, {"messages": other}, {"messages": second}], capsys)
    assert "rated turns    3 (rated turns per conversation: 1 in 1, 2 in 1 conversations)" in out, out
    assert "folded         1 records rate a turn of another record's conversation" in out, out
    assert "labels         2 desirable, 1 undesirable" in out, out
