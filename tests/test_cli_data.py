"""`prospect data check` and `prospect data preview` through the command line.

Malformed data: exit code 2 and a one-line message naming the file, the record index and the field,
with no traceback (the README's exit codes). The in-process calls of `prospect.cli.main` check
the messages; one subprocess run checks the real exit path.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS_DIR
from prospect.cli import main
from prospect.config import build_config
from prospect.data.encode import DroppedExample, encode_example
from prospect.data.formats import load_examples
from prospect.data.registry import resolve_datasets
from prospect.data.report import kto_balance
from prospect.data.templates import get_template

QWEN_DIR = MODELS_DIR / "qwen2.5-instruct-tokenizer"
REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not QWEN_DIR.is_dir(), reason=f"reference tokenizer {QWEN_DIR} is missing")


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
TOOLS = json.dumps([{"name": "get_weather", "description": "Weather of a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])

SHAREGPT_ENTRY = {"formatting": "sharegpt"}
TOOL_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
KTO_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "kto_tag": "label"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}
NEMO_ENTRY = {"formatting": "nemo"}

SFT_OK = {"conversations": [human("Hello"), gpt("Hi, how can I help?")]}
TOOL_OK = {"conversations": [human("Weather in Paris?"), {"from": "function_call", "value": CALL},
                             {"from": "observation", "value": '{"temp": 21}'}, gpt("It is 21 degrees.")],
           "tools": TOOLS}
KTO_OK = {"messages": [user("Hello"), assistant("Hi!")], "label": True}
NEMO_OK = {"prompt": "Hello", "response": "Hi!", "preference": "chosen"}


def write_config(tmp_path: Path, entry: dict, file_name: str, content: str, **overrides) -> str:
    """A dataset_dir with dataset_info.json + one data file, and a config that selects it."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / file_name).write_text(content, encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"d": {"file_name": file_name, **entry}}))
    config = {
        "model_name_or_path": str(QWEN_DIR),
        "template": "qwen",
        "dataset": "d",
        "dataset_dir": str(data_dir),
        "cache_dir": str(tmp_path / "cache"),
        "cutoff_len": 512,
        **overrides,
    }
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()))
    return str(path)


@pytest.fixture
def session_tokenizer(monkeypatch, qwen_tokenizer):
    """`data check` gets the session's Qwen tokenizer instead of loading it again (~0.5 s a call)."""
    import prospect.model

    def load_tokenizer(name_or_path, **kwargs):
        assert name_or_path == str(QWEN_DIR)
        return qwen_tokenizer

    monkeypatch.setattr(prospect.model, "load_tokenizer", load_tokenizer)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------
# Malformed records: (entry, good record, bad record, stage, field named in the message)

MALFORMED = {
    "wrong_role_order": (
        SHAREGPT_ENTRY, SFT_OK, {"conversations": [human("a"), human("b"), gpt("c")]}, "sft",
        "conversations[1].from"),
    "kto_label_not_boolean": (
        KTO_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")], "label": "yes"}, "kto", "label"),
    "nemo_preference_not_chosen_or_rejected": (
        NEMO_ENTRY, NEMO_OK, {"prompt": "a", "response": "b", "preference": "good"}, "kto", "preference"),
    "label_missing_with_stage_kto": (
        KTO_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")]}, "kto", "label"),
    "empty_content": (
        SHAREGPT_ENTRY, SFT_OK, {"conversations": [human("a"), gpt("")]}, "sft", "conversations[1].value"),
    "non_string_content": (
        SHAREGPT_ENTRY, SFT_OK, {"conversations": [human(["a", "list"]), gpt("b")]}, "sft",
        "conversations[0].value"),
    "function_call_not_json": (
        TOOL_ENTRY, TOOL_OK,
        {"conversations": [human("a"), {"from": "function_call", "value": "get_weather(city=Paris)"},
                           {"from": "observation", "value": "21"}, gpt("b")], "tools": TOOLS}, "sft",
        "conversations[1].value"),
    "tools_not_a_json_list": (
        TOOL_ENTRY, TOOL_OK, {"conversations": [human("a"), gpt("b")], "tools": '{"name": "get_weather"}'},
        "sft", "tools"),
    "turn_label_on_a_user_turn": (
        KTO_ENTRY, KTO_OK, {"messages": [dict(user("a"), label=True), assistant("b")], "label": False}, "kto",
        "messages[0].label"),
    "turn_label_not_boolean": (
        KTO_ENTRY, KTO_OK, {"messages": [user("a"), dict(assistant("b"), label="yes")]}, "kto", "messages[1].label"),
    "turn_label_disagrees_with_the_record_label": (
        KTO_ENTRY, KTO_OK, {"messages": [user("a"), dict(assistant("b"), label=True)], "label": False}, "kto",
        "label"),
    "kto_not_ending_with_assistant": (
        KTO_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b"), user("c")], "label": False}, "kto",
        "messages[2].role"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_data_check_malformed_record_exits_2_naming_file_record_and_field(tmp_path, capsys, session_tokenizer,
                                                                         case):
    entry, good, bad, stage, field = MALFORMED[case]
    file_name = "data.jsonl" if entry is NEMO_ENTRY else "data.json"
    records = [good, bad, good]
    content = ("\n".join(json.dumps(r) for r in records) + "\n") if file_name.endswith(".jsonl") \
        else json.dumps(records, indent=1)
    config = write_config(tmp_path, entry, file_name, content, stage=stage)

    code, out, err = run_cli(capsys, "data", "check", config)

    data_path = os.path.join(str(tmp_path / "data"), file_name)
    assert code == 2
    assert err.startswith(f'error: {data_path}: record 1: field "{field}": '), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1  # one short message
    assert out == ""  # no half-printed report


def test_data_check_corrupt_json_file_names_the_line(tmp_path, capsys, session_tokenizer):
    text = json.dumps([SFT_OK], indent=1)  # line 1 "[", the record from line 2 on
    broken = text[:-2] + ",\n {\"conversations\": [}\n]"  # a second record that is not JSON
    broken_line = broken.count("\n", 0, broken.index("[}")) + 1
    config = write_config(tmp_path, SHAREGPT_ENTRY, "data.json", broken)

    code, out, err = run_cli(capsys, "data", "check", config)

    data_path = os.path.join(str(tmp_path / "data"), "data.json")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {data_path}: invalid JSON at line {broken_line}, column "), err
    assert "Traceback" not in err


def test_data_check_corrupt_jsonl_line_names_record_and_line(tmp_path, capsys, session_tokenizer):
    lines = [json.dumps(NEMO_OK), "", '{"prompt": "a", "response": "b", "preference": ', json.dumps(NEMO_OK)]
    config = write_config(tmp_path, NEMO_ENTRY, "data.jsonl", "\n".join(lines) + "\n", stage="kto")

    code, out, err = run_cli(capsys, "data", "check", config)

    data_path = os.path.join(str(tmp_path / "data"), "data.jsonl")
    assert code == 2 and out == ""
    # record 1 (the blank line is not a record) is on line 3 of the file
    assert err.startswith(f"error: {data_path}: record 1 (line 3): invalid JSON"), err
    assert "fix or remove line 3" in err and "Traceback" not in err


def test_data_check_subprocess_exits_2_without_traceback(tmp_path):
    entry, good, bad, stage, field = MALFORMED["kto_label_not_boolean"]
    config = write_config(tmp_path, entry, "data.json", json.dumps([good, bad, good]), stage=stage)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    result = subprocess.run([sys.executable, "-m", "prospect", "data", "check", config],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    data_path = os.path.join(str(tmp_path / "data"), "data.json")
    assert f'{data_path}: record 1: field "label": expected true or false, got "yes"' in result.stderr
    assert result.stdout == ""


def test_data_check_skips_bad_records_on_request_and_lists_them(tmp_path, capsys, session_tokenizer):
    entry, good, bad, stage, field = MALFORMED["wrong_role_order"]
    records = [good, bad, good, bad, good]
    config = write_config(tmp_path, entry, "data.json", json.dumps(records), on_bad_record="skip")

    code, out, err = run_cli(capsys, "data", "check", config)

    assert code == 0, err
    data_path = os.path.join(str(tmp_path / "data"), "data.json")
    assert "  records        5 read, 2 skipped as malformed, 0 beyond max_samples" in out
    assert "  examples       3 kept, 0 dropped" in out
    assert "  skipped        records 1, 3\n" in out
    assert f'    {data_path}: record 1: field "{field}": ' in out
    assert f'    {data_path}: record 3: field "{field}": ' in out
    assert "total: 3 train examples, 0 eval examples" in out


# ----------------------------------------------------------------------------------------------
# What `data check` prints


def _kto_records():
    long_prompt = "Please summarise this text: " + "the quick brown fox jumps over the lazy dog " * 15
    long_answer = "Here is my answer: " + "the quick brown fox jumps over the lazy dog " * 15
    return [
        {"messages": [user("What is 2 + 2?"), assistant("4.")], "label": True},
        {"messages": [user("Capital of France?"), assistant("Paris.")], "label": True},
        {"messages": [user("Tell me a story."), assistant(long_answer)], "label": True},  # truncated
        {"messages": [user("What is 3 + 3?"), assistant("7.")], "label": False},
        {"messages": [user(long_prompt), assistant("No.")], "label": False},  # prompt > cutoff: dropped
    ]


@pytest.mark.parametrize("truncation_mode", ["keep_end", "keep_start"])
def test_data_check_prints_counts_balance_truncation_and_trained_tokens(tmp_path, capsys, qwen_tokenizer,
                                                                        truncation_mode):
    cutoff = 64
    config_path = write_config(tmp_path, KTO_ENTRY, "data.json", json.dumps(_kto_records()), stage="kto",
                               cutoff_len=cutoff, truncation_mode=truncation_mode)

    code, out, err = run_cli(capsys, "data", "check", config_path)
    assert code == 0, err

    # The numbers, worked out independently of the pipeline: load + encode_example one by one.
    config = build_config({"template": "qwen", "stage": "kto", "dataset": "d", "cutoff_len": cutoff,
                           "dataset_dir": str(tmp_path / "data")})
    [spec] = resolve_datasets(config.dataset_dir, ["d"])
    examples, _ = load_examples(spec, config.dataset_dir, stage="kto")
    template = get_template("qwen", qwen_tokenizer, None)
    encoded = [encode_example(e, template, qwen_tokenizer, stage="kto", cutoff_len=cutoff,
                              truncation_mode=truncation_mode) for e in examples]
    kept = [e for e in encoded if not isinstance(e, DroppedExample)]
    trained = sum(e.num_trained_tokens for e in kept)
    longest = max(e.num_tokens_before_cutoff for e in kept)

    lines = out.splitlines()
    assert lines[0] == f"model {QWEN_DIR} (tokenizer only) | template qwen | stage kto | cutoff_len {cutoff}"
    assert "dataset d (train)" in lines
    assert "  records        5 read, 0 skipped as malformed, 0 beyond max_samples" in lines
    if truncation_mode == "keep_start":  # the long prompt fills cutoff_len: that example is dropped
        assert [isinstance(e, DroppedExample) for e in encoded] == [False, False, False, False, True]
        assert "  examples       4 kept, 1 dropped (1 no trained token within cutoff_len)" in lines
        assert "  labels         3 desirable, 1 undesirable" in lines
        assert "  truncated      1 longer than cutoff_len 64 (cut at the end)" in lines
    else:  # its prompt is cut from the start instead; the long answer is cut at its end
        assert kept == encoded and kept[4].prompt_tokens_cut > 0 and kept[2].completion_tokens_cut > 0
        assert "  examples       5 kept, 0 dropped" in lines
        assert "  labels         3 desirable, 2 undesirable" in lines
        prompts_cut = sum(e.prompt_tokens_cut > 0 for e in kept)  # 2: the long answer's share leaves its
        completions_cut = sum(e.completion_tokens_cut > 0 for e in kept)  # prompt 13 tokens (LLaMA-Factory's split)
        assert (prompts_cut, completions_cut) == (2, 1)
        assert ("  truncated      2 longer than cutoff_len 64: 2 prompts cut from the start (oldest turns first), "
                "1 completions cut at the end") in lines
    assert f"  trained tokens {trained:,}" in lines
    assert re.search(rf"^  tokens/example p50 \d+, p90 \d+, p99 \d+, max {longest}$", out, re.M)
    assert f"total: {len(kept)} train examples, 0 eval examples, {trained:,} trained tokens" in lines
    if truncation_mode == "keep_end":
        return

    [balance] = [line for line in lines if line.startswith("KTO balance (train split): ")]
    assert "λD·nD/(λU·nU) = 1·3/(1·1) = 3.00, outside [1, 4/3]" in balance
    suggested = float(re.search(r"set kto_chosen_weight: ([0-9.e-]+) \(with kto_rejected_weight: 1\)",
                                balance).group(1))
    assert 1 <= suggested * 3 / (1 * 1) <= 4 / 3

    # Applying the suggestion silences the warning.
    code, out, err = run_cli(capsys, "data", "check", config_path, f"kto_chosen_weight={suggested}")
    assert code == 0
    assert re.search(r"KTO balance \(train split\): .* = 1\.0\d \(within \[1, 4/3\]\)$", out, re.M), out


@pytest.mark.parametrize("n_d, n_u, rejected_weight", [
    (3, 1, 1.0), (1, 3, 1.0), (150, 150, 1.0), (1000, 7, 1.0), (3, 7, 0.3), (10, 11, 1.0), (7, 3, 2.0),
])
def test_suggested_weight_lands_in_range_when_printed_and_applied(n_d, n_u, rejected_weight):
    ratio, suggested = kto_balance(n_d, n_u, 1.0, rejected_weight)
    if 1 <= ratio <= 4 / 3:
        assert suggested is None
        return
    assert suggested is not None
    printed = float(f"{suggested:g}")  # what the user copies from the balance line
    new_ratio, again = kto_balance(n_d, n_u, printed, rejected_weight)
    assert again is None and 1 - 1e-9 <= new_ratio <= 4 / 3
    assert math.isclose(new_ratio, printed * n_d / (rejected_weight * n_u))


# ----------------------------------------------------------------------------------------------
# What `data preview` prints


def test_data_preview_marks_exactly_the_assistant_replies(tmp_path, capsys):
    records = [
        {"conversations": [human("Hi there"), gpt("Hello! How can I help?"), human("2+2?"), gpt("4")]},
        {"conversations": [{"from": "system", "value": "Be brief."}, human("Name a colour"), gpt("Blue")]},
        {"conversations": [human("x"), gpt("never shown")]},
    ]
    config = write_config(tmp_path, SHAREGPT_ENTRY, "data.json", json.dumps(records))

    code, out, err = run_cli(capsys, "data", "preview", config, "--n", "2")

    assert code == 0, err
    assert out.count("─── example ") == 2 and "never shown" not in out
    examples, legend = out.split("─── trained spans are marked ")
    assert legend == "⟦like this⟧\n"
    assert re.findall(r"⟦(.*?)⟧", examples, re.S) == [
        "Hello! How can I help?<|im_end|>", "4<|im_end|>", "Blue<|im_end|>"]
    assert "<|im_start|>user\nHi there<|im_end|>" in out  # the prompt is shown, unmarked
    assert "<|im_start|>system\nBe brief.<|im_end|>" in out


@pytest.mark.parametrize("cutoff", [512, 1024])
def test_kto_en_demo_keeps_every_example_and_truncation_keeps_what_matters(tmp_path, capsys, cutoff):
    """LLaMA-Factory's kto_en_demo (multi-turn prompts up to 4k tokens): nothing dropped at the reference
    config's cutoff_len or below; a truncated example keeps the prompt's last turn and the completion's start.
    The oracle is the raw JSON record."""
    from conftest import DATA_DIR
    from prospect.data.pipeline import prepare_data
    from prospect.model import load_tokenizer

    overrides = {"model_name_or_path": str(QWEN_DIR), "template": "qwen", "stage": "kto", "dataset": "kto_en_demo",
                 "dataset_dir": str(DATA_DIR), "cache_dir": str(tmp_path / "cache"), "cutoff_len": cutoff}
    config_file = tmp_path / "kto.yaml"
    config_file.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in overrides.items()))
    code, out, err = run_cli(capsys, "data", "check", str(config_file))
    assert code == 0, err
    assert "  examples       300 kept, 0 dropped" in out.splitlines()
    assert re.search(rf"^  truncated      \d+ longer than cutoff_len {cutoff}: [1-9]\d* prompts cut from the start "
                     r"\(oldest turns first\), [1-9]\d* completions cut at the end$", out, re.M), out

    tokenizer = load_tokenizer(str(QWEN_DIR))
    train = prepare_data(build_config(overrides), tokenizer).train  # from the cache data check wrote
    records = json.loads((DATA_DIR / "kto_en_demo.json").read_text())
    checked = 0
    for row in train:
        if not row["prompt_tokens_cut"]:
            continue
        messages = records[int(row["origin"].rsplit("#", 1)[1])]["messages"]
        prompt = tokenizer.decode(row["input_ids"][: row["prompt_len"]])
        completion = tokenizer.decode(row["input_ids"][row["prompt_len"] :])
        assert len(row["input_ids"]) <= cutoff and row["label"] == records[int(row["origin"].rsplit("#", 1)[1])]["label"]
        last_user = messages[-2]["content"]
        if row["prompt_len"] > len(tokenizer(last_user)["input_ids"]) + 8:  # the last user turn fits: whole
            assert prompt.endswith(f"<|im_start|>user\n{last_user}<|im_end|>\n<|im_start|>assistant\n")
        else:  # even the last turn is cut: its end, then the assistant header
            assert prompt.endswith(f"{last_user[-20:]}<|im_end|>\n<|im_start|>assistant\n")
        full_completion = messages[-1]["content"] + "<|im_end|>"
        assert full_completion.startswith(completion) and len(completion) > 0
        checked += 1
    assert checked >= 10
