"""Token ids and loss masks: exact ids, exactly the assistant turns trained, KTO split, cutoff."""

from __future__ import annotations

import functools
import json

import pytest

from prospect.data.encode import IGNORE_INDEX, DroppedExample, DropReason, EncodedExample, encode_example
from prospect.data.example import Example, Message
from prospect.data.templates import get_template
from prospect.data.tool_calls import to_hf_messages, to_hf_tools
from prospect.errors import UserError

from test_templates import (  # tests/ is on sys.path (pytest's rootdir-less prepend import)
    CONVERSATIONS,
    SMOLLM_SYSTEM,
    conversation,
    glaive_example,
    official_ids,
    official_text,
    token_ids,
)

# (tokenizer fixture, template name, default_system, end-of-turn token, whether the template trims content)
SETUPS = [
    ("qwen_tokenizer", "qwen", None, "<|im_end|>", False),
    ("qwen_tokenizer", "auto", None, "<|im_end|>", False),
    ("llama3_tokenizer", "llama3", None, "<|eot_id|>", True),
    ("llama3_tokenizer", "auto", None, "<|eot_id|>", True),
    ("smollm_tokenizer", "chatml", SMOLLM_SYSTEM, "<|im_end|>", False),
    ("smollm_tokenizer", "auto", None, "<|im_end|>", False),
]
SETUP_IDS = [f"{s[1]}-{s[0].split('_')[0]}" for s in SETUPS]


def trained_runs(encoded: EncodedExample) -> list[list[int]]:
    """The trained token ids, split into maximal runs of consecutive trained positions."""
    runs: list[list[int]] = []
    previous_trained = False
    for token, label in zip(encoded.input_ids, encoded.labels):
        trained = label != IGNORE_INDEX
        if trained:
            assert label == token  # labels are aligned with input_ids (the loss shifts them)
            if not previous_trained:
                runs.append([])
            runs[-1].append(token)
        previous_trained = trained
    return runs


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def expected_turn_text(message: Message, end_of_turn: str, trims: bool) -> str:
    """What the model must learn to write for a trained turn, built without the template code."""
    if message.role == "function_call":
        content = "<tool_call>\n" + json.dumps(json.loads(message.content), ensure_ascii=False) + "\n</tool_call>"
    else:
        content = message.content.strip() if trims else message.content
    return content + end_of_turn


def sft(messages, tools=(), origin="test.json#0") -> Example:
    return Example(messages=list(messages), tools=list(tools), origin=origin, dataset="test")


def kto(messages, label, origin="kto.json#0") -> Example:
    return Example(messages=list(messages), label=label, origin=origin, dataset="kto_test")


@pytest.fixture(params=SETUPS, ids=SETUP_IDS)
def setup(request):
    tokenizer_fixture, name, default_system, end_of_turn, trims = request.param
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    return tokenizer, get_template(name, tokenizer, default_system), end_of_turn, trims


# --------------------------------------------------------------------------------------------------
# SFT


@pytest.mark.parametrize("conversation_name", ["single_turn", "multi_turn", "system_single_turn", "system_multi_turn"])
def test_sft_ids_are_official_and_only_assistant_turns_are_trained(setup, conversation_name):
    tokenizer, template, end_of_turn, trims = setup
    messages = CONVERSATIONS[conversation_name]
    encoded = encode_example(sft(messages), template, tokenizer, stage="sft", cutoff_len=4096)

    assert encoded.input_ids == official_ids(tokenizer, to_hf_messages(messages))
    assert encoded.num_tokens_before_cutoff == len(encoded.input_ids)
    assert encoded.label is None
    assistant_turns = [m for m in messages if m.role == "assistant"]
    assert [decode(tokenizer, run) for run in trained_runs(encoded)] == [
        expected_turn_text(m, end_of_turn, trims) for m in assistant_turns
    ]
    assert encoded.labels[encoded.prompt_len] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in encoded.labels[: encoded.prompt_len])


def test_sft_tool_calls_are_trained_and_observations_are_not(request, glaive_records):
    cases = [
        ("qwen_tokenizer", "qwen", None, "<|im_end|>"),
        ("qwen_tokenizer", "auto", None, "<|im_end|>"),
        ("llama3_tokenizer", "llama3", None, "<|eot_id|>"),
        ("smollm_tokenizer", "chatml", SMOLLM_SYSTEM, "<|im_end|>"),
    ]
    records = glaive_records[:30]
    assert sum(any(t["from"] == "function_call" for t in r["conversations"]) for r in records) >= 10
    for tokenizer_fixture, name, default_system, end_of_turn in cases:
        tokenizer = request.getfixturevalue(tokenizer_fixture)
        template = get_template(name, tokenizer, default_system)
        for index, record in enumerate(records):
            messages, tools = glaive_example(record)
            encoded = encode_example(sft(messages, tools), template, tokenizer, stage="sft", cutoff_len=8192)
            if name in ("qwen", "auto"):
                hf_tools = to_hf_tools(tools) or None
                assert encoded.input_ids == official_ids(tokenizer, to_hf_messages(messages), hf_tools)
            trained = [m for m in messages if m.role in ("assistant", "function_call")]
            assert [decode(tokenizer, run) for run in trained_runs(encoded)] == [
                expected_turn_text(m, end_of_turn, trims=name == "llama3") for m in trained
            ], f"{name} record {index}"


def test_train_on_prompt_trains_every_token(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    example = sft(CONVERSATIONS["multi_turn"])
    encoded = encode_example(example, template, qwen_tokenizer, stage="sft", cutoff_len=4096, train_on_prompt=True)
    assert encoded.labels == encoded.input_ids
    assert encoded.prompt_len == 0


@pytest.mark.parametrize("last_role", ["assistant", "function_call"])
def test_mask_history_trains_only_the_last_turn(qwen_tokenizer, last_role):
    template = get_template("qwen", qwen_tokenizer)
    messages = list(CONVERSATIONS["multi_turn"])
    if last_role == "function_call":
        messages[-1] = Message("function_call", '{"name": "thank", "arguments": {"who": "you"}}')
    plain = encode_example(sft(messages), template, qwen_tokenizer, stage="sft", cutoff_len=4096)
    last_only = encode_example(sft(messages), template, qwen_tokenizer, stage="sft", cutoff_len=4096, mask_history=True)

    assert last_only.input_ids == plain.input_ids
    runs = trained_runs(last_only)
    assert len(trained_runs(plain)) == 3 and len(runs) == 1
    assert decode(qwen_tokenizer, runs[0]) == expected_turn_text(messages[-1], "<|im_end|>", trims=False)
    assert runs[0] == trained_runs(plain)[-1]
    assert last_only.prompt_len > plain.prompt_len
    assert last_only.input_ids[last_only.prompt_len : last_only.prompt_len + len(runs[0])] == runs[0]
    assert last_only.labels[last_only.prompt_len] != IGNORE_INDEX


def test_conversation_without_trained_turn_is_dropped(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    example = sft(conversation(("system", "s"), ("user", "Anyone there?")), origin="chat.json#4")
    result = encode_example(example, template, qwen_tokenizer, stage="sft", cutoff_len=4096)
    assert result == DroppedExample(DropReason.NO_TRAINED_TURN, "chat.json#4", 0)


def test_whole_text_tokenization_keeps_merges_across_the_header_boundary(qwen_tokenizer):
    """A content starting with newlines merges with the header's newline: tokenizing the pieces
    separately would give ids the official template never produces. The merged token starts in the
    header, so it belongs to the prompt."""
    template = get_template("qwen", qwen_tokenizer)
    messages = conversation(("user", "Hi"), ("assistant", "\n\nHello"))
    rendered = template.render(messages)
    encoded = encode_example(sft(messages), template, qwen_tokenizer, stage="sft", cutoff_len=4096)

    assert encoded.input_ids == official_ids(qwen_tokenizer, to_hf_messages(messages))
    span = rendered.trained_spans[0]
    piecewise = token_ids(qwen_tokenizer, rendered.text[: span.start]) + token_ids(
        qwen_tokenizer, rendered.text[span.start :]
    )
    assert piecewise != encoded.input_ids  # the boundary matters for this tokenizer
    assert [decode(qwen_tokenizer, run) for run in trained_runs(encoded)] == ["Hello<|im_end|>"]


# --------------------------------------------------------------------------------------------------
# KTO


@pytest.mark.parametrize("conversation_name", ["single_turn", "system_multi_turn"])
@pytest.mark.parametrize("label", [True, False])
def test_kto_prompt_and_completion_split(setup, conversation_name, label):
    tokenizer, template, end_of_turn, trims = setup
    messages = CONVERSATIONS[conversation_name]
    encoded = encode_example(kto(messages, label), template, tokenizer, stage="kto", cutoff_len=4096)

    hf_messages = to_hf_messages(messages)
    prompt_ids = official_ids(tokenizer, hf_messages[:-1], add_generation_prompt=True)
    assert encoded.input_ids[: encoded.prompt_len] == prompt_ids
    completion = encoded.input_ids[encoded.prompt_len :]
    assert decode(tokenizer, completion) == expected_turn_text(messages[-1], end_of_turn, trims)
    assert encoded.labels == [IGNORE_INDEX] * encoded.prompt_len + completion  # earlier turns untrained
    assert encoded.label is label
    # The sequence ends with the end-of-turn token: the official rendering, minus what follows it.
    full_text = official_text(tokenizer, hf_messages)
    assert encoded.input_ids == token_ids(tokenizer, full_text[: full_text.rindex(end_of_turn) + len(end_of_turn)])


def test_kto_needs_a_label(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    with pytest.raises(UserError, match="kto.json#0: a KTO example needs a label"):
        encode_example(kto(CONVERSATIONS["single_turn"], None), template, qwen_tokenizer, stage="kto", cutoff_len=64)


@pytest.mark.parametrize("last_role", ["user", "function_call", "observation"])
def test_kto_must_end_with_an_assistant_turn(qwen_tokenizer, last_role):
    template = get_template("qwen", qwen_tokenizer)
    content = '{"name": "f", "arguments": {}}' if last_role == "function_call" else "text"
    messages = conversation(("user", "hi"), ("assistant", "hello"), (last_role, content))
    example = kto(messages, True, origin="feedback.jsonl#12")
    expected_message = f"feedback.jsonl#12: a KTO example must end with an assistant turn.*{last_role}"
    with pytest.raises(UserError, match=expected_message):
        encode_example(example, template, qwen_tokenizer, stage="kto", cutoff_len=4096)


# --------------------------------------------------------------------------------------------------
# cutoff_len


def test_cutoff_keeps_the_start_of_the_sequence(llama3_tokenizer):
    template = get_template("llama3", llama3_tokenizer)
    example = sft(CONVERSATIONS["multi_turn"])
    full = encode_example(example, template, llama3_tokenizer, stage="sft", cutoff_len=4096)
    cutoff = full.prompt_len + 3
    cut = encode_example(example, template, llama3_tokenizer, stage="sft", cutoff_len=cutoff)

    assert cut.input_ids == full.input_ids[:cutoff]
    assert cut.labels == full.labels[:cutoff]
    assert cut.num_tokens_before_cutoff == len(full.input_ids) > cutoff
    assert cut.prompt_len == full.prompt_len
    assert sum(label != IGNORE_INDEX for label in cut.labels) == cut.num_trained_tokens == 3


def test_cutoff_drops_examples_without_trained_token(llama3_tokenizer):
    template = get_template("llama3", llama3_tokenizer)
    example = sft(CONVERSATIONS["multi_turn"], origin="long.json#9")
    full = encode_example(example, template, llama3_tokenizer, stage="sft", cutoff_len=4096)
    dropped = encode_example(example, template, llama3_tokenizer, stage="sft", cutoff_len=full.prompt_len)
    assert dropped == DroppedExample(DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF, "long.json#9", len(full.input_ids))
    assert dropped.reason.value == "no trained token within cutoff_len"


def test_cutoff_drops_an_example_whose_only_trained_token_is_the_first(qwen_tokenizer):
    """Token 0 has no token before it to be predicted from: it carries no loss, so an example whose only
    trained token is it would train on nothing (and divide a step by zero trained tokens)."""
    template = get_template("qwen", qwen_tokenizer)
    example = sft(CONVERSATIONS["single_turn"], origin="one.json#3")
    dropped = encode_example(example, template, qwen_tokenizer, stage="sft", cutoff_len=1, train_on_prompt=True)
    assert isinstance(dropped, DroppedExample) and dropped.reason is DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF
    kept = encode_example(example, template, qwen_tokenizer, stage="sft", cutoff_len=2, train_on_prompt=True)
    assert isinstance(kept, EncodedExample) and kept.num_trained_targets == 1


def test_kto_keep_start_truncates_the_completion_and_drops_a_prompt_only_example(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    example = kto(CONVERSATIONS["system_multi_turn"], False)
    full = encode_example(example, template, qwen_tokenizer, stage="kto", cutoff_len=4096)
    cut = encode_example(example, template, qwen_tokenizer, stage="kto", cutoff_len=full.prompt_len + 1,
                         truncation_mode="keep_start")
    assert cut.input_ids == full.input_ids[: full.prompt_len + 1]
    assert cut.prompt_len == full.prompt_len and cut.num_trained_tokens == 1

    dropped = encode_example(example, template, qwen_tokenizer, stage="kto", cutoff_len=full.prompt_len,
                             truncation_mode="keep_start")
    assert isinstance(dropped, DroppedExample)
    assert dropped.reason is DropReason.NO_TRAINED_TOKEN_WITHIN_CUTOFF


LONG_KTO = conversation(
    ("system", "You are a careful assistant who answers questions about geography."),
    ("user", "Tell me about Italy, its regions and its history. " * 4),
    ("assistant", "Italy is a country in southern Europe with twenty regions. " * 6),
    ("user", "And Spain? " * 3),
    ("assistant", "Spain lies on the Iberian peninsula. " * 5),
    ("user", "Which of the two is larger, and by how much? Answer with numbers."),
    ("assistant", "Spain is larger: about 506,000 km² against Italy's 301,000 km². " * 3),
)


def _kto_candidates(messages):
    """Oracle: the shortened conversations keep_end may choose, most history first, the system prompt
    tried first for each start (written from the rule, not from the code)."""
    system = [messages[0]] if messages[0].role == "system" else []
    starts = [k for k in range(len(system), len(messages) - 1) if messages[k].role == "user"]
    out = []
    for k in starts:
        for with_system in ((True, False) if system else (False,)):
            candidate = (system if with_system else []) + list(messages[k:])
            if candidate != list(messages):
                out.append(candidate)
    return out


def test_kto_keep_end_keeps_every_example_the_completion_start_and_the_latest_turns(setup):
    """For every cutoff_len: nothing dropped; the completion's first tokens; a prompt that is the
    official rendering of the conversation with the most history that fits its budget (LLaMA-Factory's
    split), else the last tokens of the shortest one."""
    tokenizer, template, _, _ = setup
    messages = LONG_KTO
    example = kto(messages, True)
    full_ids = official_ids(tokenizer, to_hf_messages(messages))
    full_prompt = official_ids(tokenizer, to_hf_messages(messages[:-1]), add_generation_prompt=True)
    completion = full_ids[len(full_prompt):]
    end = len(full_prompt) + next(i for i, t in enumerate(completion)
                                  if decode(tokenizer, completion[: i + 1]).endswith(template.end_of_turn)) + 1
    full_ids, completion = full_ids[:end], full_ids[len(full_prompt):end]  # the text ends at the end of turn
    prompts = [official_ids(tokenizer, to_hf_messages(c[:-1]), add_generation_prompt=True)
               for c in _kto_candidates(messages)]
    total, P, C = len(full_ids), len(full_prompt), len(completion)
    cases = 0
    for cutoff in sorted({2, 3, 5, 9, 17, 33, 64, 100, 150, 200, total - 1, total, total + 5} | set(range(2, total, 23))):
        encoded = encode_example(example, template, tokenizer, stage="kto", cutoff_len=cutoff)
        assert isinstance(encoded, EncodedExample), f"cutoff_len {cutoff}: a KTO example must never be dropped"
        ids, n = encoded.input_ids, encoded.prompt_len
        assert len(ids) <= cutoff and encoded.num_tokens_before_cutoff == total
        assert encoded.labels == [IGNORE_INDEX] * n + ids[n:]
        if cutoff >= total:
            assert ids == full_ids and encoded.prompt_tokens_cut == encoded.completion_tokens_cut == 0
            continue
        keep_c = cutoff if 2 * C < cutoff else cutoff - P if 2 * P < cutoff else cutoff * C // (P + C)
        budget = cutoff - max(1, min(keep_c, C))  # at least one completion token
        kept = ids[n:]
        assert kept == completion[: len(kept)] and len(kept) == min(C, cutoff - n) >= 1
        assert encoded.completion_tokens_cut == C - len(kept) and encoded.prompt_tokens_cut == P - n
        if P <= budget:
            assert ids[:n] == full_prompt
        elif any(len(p) <= budget for p in prompts):
            chosen = next(p for p in prompts if len(p) <= budget)
            assert ids[:n] == chosen, f"cutoff_len {cutoff}: not the candidate with the most history that fits"
        else:
            shortest = prompts[-1]
            bos = [shortest[0]] if shortest[0] == tokenizer.bos_token_id and budget >= 2 else []
            assert ids[:n] == bos + shortest[len(shortest) - (budget - len(bos)):]
        cases += 1
    assert cases > 8


def test_kto_keep_end_prompt_decodes_as_the_latest_turns(qwen_tokenizer):
    template = get_template("qwen", qwen_tokenizer)
    encoded = encode_example(kto(LONG_KTO, False), template, qwen_tokenizer, stage="kto", cutoff_len=120)
    prompt, completion = decode(qwen_tokenizer, encoded.input_ids[: encoded.prompt_len]), decode(
        qwen_tokenizer, encoded.input_ids[encoded.prompt_len :])
    assert prompt.endswith("<|im_start|>user\nWhich of the two is larger, and by how much? Answer with numbers."
                           "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.startswith("<|im_start|>system\nYou are a careful assistant"), "the system prompt fits: kept"
    assert "Italy, its regions" not in prompt and "Iberian" not in prompt
    assert completion.startswith("Spain is larger: about 506,000") and encoded.completion_tokens_cut > 0


# --------------------------------------------------------------------------------------------------
# Worker processes


def _encode_row(row: dict, *, template, tokenizer) -> dict:
    result = encode_example(Example.from_json(row["example"]), template, tokenizer, stage="sft", cutoff_len=4096)
    assert isinstance(result, EncodedExample)
    return {"input_ids": result.input_ids, "labels": result.labels}


def test_encoding_runs_in_datasets_map_workers(smollm_tokenizer, glaive_records):
    """The template and tokenizer travel to datasets.map(num_proc=2) workers (SmolLM2's small
    tokenizer keeps the pickling cheap)."""
    datasets = pytest.importorskip("datasets")
    template = get_template("chatml", smollm_tokenizer, SMOLLM_SYSTEM)
    examples = [sft(*glaive_example(record), origin=f"glaive#{i}") for i, record in enumerate(glaive_records[:8])]
    dataset = datasets.Dataset.from_list([{"example": e.to_json()} for e in examples])
    encode_row = functools.partial(_encode_row, template=template, tokenizer=smollm_tokenizer)
    mapped = dataset.map(
        encode_row, num_proc=2, remove_columns=["example"], load_from_cache_file=False, new_fingerprint="encode-test"
    )

    for row, example in zip(mapped, examples):
        direct = encode_example(example, template, smollm_tokenizer, stage="sft", cutoff_len=4096)
        assert row["input_ids"] == direct.input_ids and row["labels"] == direct.labels
