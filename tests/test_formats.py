"""Reading dataset files and converting records to Examples (prospect.data.formats)."""

from __future__ import annotations

import json
import os
import time

import pytest

from prospect.data.example import Example, Message
from prospect.data.files import data_files, read_records
from prospect.data.formats import load_examples
from prospect.data.registry import DatasetSpec, resolve_datasets
from prospect.errors import UserError

# ../shared/data holds the reference demo datasets; PROSPECT_SHARED_DIR overrides.
SHARED_DATA = os.path.normpath(os.path.join(
    os.environ.get("PROSPECT_SHARED_DIR",
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")),
    "data"))
needs_shared = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_DATA, "dataset_info.json")),
    reason="reference data (../shared/data) not present",
)

# ----------------------------------------------------------------------------------------------
# Helpers


def write_records(path, records) -> None:
    """Write records as a JSON list (.json), JSON Lines (.jsonl), Parquet or CSV, by extension."""
    path = str(path)
    if path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    elif path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(records, handle, indent=2)
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.endswith(".csv"):
        import pyarrow as pa
        import pyarrow.csv as pacsv

        pacsv.write_csv(pa.Table.from_pylist(records), path)
    else:
        raise AssertionError(path)


def load(tmp_path, records, entry=None, *, file_name="data.json", stage="sft",
         on_bad_record="error"):
    """Write records and a one-entry dataset_info.json (entry=None: name the file directly)."""
    write_records(tmp_path / file_name, records)
    if entry is None:
        [spec] = resolve_datasets(str(tmp_path), [file_name])
    else:
        info = {"ds": {"file_name": file_name, **entry}}
        (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
        [spec] = resolve_datasets(str(tmp_path), ["ds"])
    return load_examples(spec, str(tmp_path), stage=stage, on_bad_record=on_bad_record)


def pairs(example: Example) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in example.messages]


def human(text):
    return {"from": "human", "value": text}


def gpt(text):
    return {"from": "gpt", "value": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


KTO_SHAREGPT_ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "kto_tag": "label"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
             "assistant_tag": "assistant"},
}
TOOL_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
ALPACA_FULL_ENTRY = {"columns": {"prompt": "instruction", "query": "input", "response": "output",
                                 "history": "history", "system": "system"}}
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
TOOLS = [{"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


# ----------------------------------------------------------------------------------------------
# The reference datasets in ../shared/data


@needs_shared
def test_kto_en_demo_has_150_desirable_and_150_undesirable():
    [spec] = resolve_datasets(SHARED_DATA, ["kto_en_demo"])
    examples, skipped = load_examples(spec, SHARED_DATA, stage="kto")
    assert skipped == []
    assert len(examples) == 300
    assert sum(example.label is True for example in examples) == 150
    assert sum(example.label is False for example in examples) == 150
    assert all(example.messages[-1].role == "assistant" for example in examples)
    assert all(example.messages[0].role == "user" for example in examples)
    first = examples[0]
    assert first.dataset == "kto_en_demo"
    assert first.origin == os.path.join(SHARED_DATA, "kto_en_demo.json") + "#0"
    assert first.messages[0].content.startswith("The Federal Trade Commission is going after")


@needs_shared
def test_glaive_toolcall_demo_parses_tools_and_function_calls():
    [spec] = resolve_datasets(SHARED_DATA, ["glaive_toolcall_en_demo"])
    examples, skipped = load_examples(spec, SHARED_DATA, stage="sft")
    assert skipped == [] and len(examples) == 300
    assert all(isinstance(example.tools, list) for example in examples)
    glaive_path = os.path.join(SHARED_DATA, "glaive_toolcall_en_demo.json")
    with open(glaive_path, encoding="utf-8") as handle:
        raw = json.load(handle)
    assert [example.tools for example in examples] == [json.loads(r["tools"]) for r in raw]
    assert sum(bool(example.tools) for example in examples) == 191  # the rest offer "[]"
    assert examples[0].tools[0]["name"] == "search_recipes"
    calls = [m for example in examples for m in example.messages if m.role == "function_call"]
    observations = [m for example in examples for m in example.messages if m.role == "observation"]
    assert len(calls) == 211 and len(observations) == len(calls)
    assert all("name" in json.loads(call.content) for call in calls)
    assert json.loads(examples[0].messages[3].content)["name"] == "search_recipes"
    assert [m.role for m in examples[0].messages[:5]] == [
        "user", "assistant", "user", "function_call", "observation"]


@needs_shared
@pytest.mark.parametrize("name, count", [("alpaca_en_demo", None), ("identity", 91)])
def test_alpaca_reference_datasets_load(name, count):
    with open(os.path.join(SHARED_DATA, f"{name}.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    [spec] = resolve_datasets(SHARED_DATA, [name])
    examples, skipped = load_examples(spec, SHARED_DATA, stage="sft")
    assert skipped == []
    assert len(examples) == len(raw) == (count or len(raw))
    for record, example in zip(raw, examples):
        prompt = "\n".join(part for part in (record["instruction"], record["input"]) if part)
        assert pairs(example) == [("user", prompt), ("assistant", record["output"])]
        assert example.label is None and example.tools == []


@needs_shared
def test_alpaca_entry_without_kto_tag_is_rejected_for_kto():
    [spec] = resolve_datasets(SHARED_DATA, ["identity"])
    with pytest.raises(UserError) as caught:
        load_examples(spec, SHARED_DATA, stage="kto")
    message = str(caught.value)
    assert 'dataset "identity"' in message and '"kto_tag"' in message and "columns" in message


@needs_shared
def test_dpo_en_demo_gives_the_ranking_error():
    with pytest.raises(UserError, match=r"pairwise data is not supported"):
        resolve_datasets(SHARED_DATA, ["dpo_en_demo"])


# ----------------------------------------------------------------------------------------------
# Formats


def test_sharegpt_from_value_with_system_turn_tools_and_calls(tmp_path):
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."}, human("Weather in Paris?"),
            {"from": "function_call", "value": CALL}, {"from": "observation", "value": "18C"},
            gpt("It is 18C."),
        ],
        "tools": json.dumps(TOOLS),
    }
    [example], skipped = load(tmp_path, [record], TOOL_ENTRY)
    assert skipped == []
    assert pairs(example) == [("system", "Be brief."), ("user", "Weather in Paris?"),
                              ("function_call", CALL), ("observation", "18C"),
                              ("assistant", "It is 18C.")]
    assert example.tools == TOOLS
    assert example.origin == os.path.join(str(tmp_path), "data.json") + "#0"
    assert example.dataset == "ds"


def test_sharegpt_system_column_and_parsed_tool_list(tmp_path):
    entry = {"formatting": "sharegpt",
             "columns": {"messages": "conversations", "system": "sys", "tools": "tools"}}
    record = {"conversations": [human("hi"), gpt("hello")], "sys": "You are kind.", "tools": TOOLS}
    [example], _ = load(tmp_path, [record], entry)
    assert pairs(example) == [("system", "You are kind."), ("user", "hi"), ("assistant", "hello")]
    assert example.tools == TOOLS


def test_sharegpt_role_content_tags(tmp_path):
    records = [{"messages": [user("a"), assistant("b"), user("c"), assistant("d")], "label": False}]
    [example], _ = load(tmp_path, records, KTO_SHAREGPT_ENTRY, stage="kto")
    assert pairs(example) == [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    assert example.label is False


def test_sharegpt_role_content_tags_without_role_values(tmp_path):
    # Only role_tag/content_tag given: "user"/"assistant" values are still understood.
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content"}}
    [example], _ = load(tmp_path, [{"messages": [user("a"), assistant("b")]}], entry)
    assert pairs(example) == [("user", "a"), ("assistant", "b")]


def test_sharegpt_custom_tags(tmp_path):
    entry = {"formatting": "sharegpt", "columns": {"messages": "dialog"},
             "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "client",
                      "assistant_tag": "agent", "observation_tag": "result",
                      "function_tag": "call", "system_tag": "rules"}}
    record = {"dialog": [{"speaker": "rules", "text": "R"}, {"speaker": "client", "text": "Q"},
                         {"speaker": "call", "text": CALL}, {"speaker": "result", "text": "ok"},
                         {"speaker": "agent", "text": "A"}]}
    [example], _ = load(tmp_path, [record], entry)
    assert pairs(example) == [("system", "R"), ("user", "Q"), ("function_call", CALL),
                              ("observation", "ok"), ("assistant", "A")]


def test_alpaca_with_history_system_and_input(tmp_path):
    record = {"instruction": "Translate", "input": "bonjour", "output": "hello",
              "system": "You translate.", "history": [["q1", "a1"], ["q2", "a2"]]}
    [example], _ = load(tmp_path, [record], ALPACA_FULL_ENTRY)
    assert pairs(example) == [("system", "You translate."), ("user", "q1"), ("assistant", "a1"),
                              ("user", "q2"), ("assistant", "a2"),
                              ("user", "Translate\nbonjour"), ("assistant", "hello")]


def test_alpaca_columns_without_query_ignore_input_like_llamafactory(tmp_path):
    entry = {"columns": {"prompt": "question", "response": "answer"}}
    record = {"question": "Q", "answer": "A", "input": "not read"}
    [example], _ = load(tmp_path, [record], entry)
    assert pairs(example) == [("user", "Q"), ("assistant", "A")]


def test_alpaca_kto_tag(tmp_path):
    entry = {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "good"}}
    records = [{"instruction": "Q", "output": "A", "good": True},
               {"instruction": "Q", "output": "B", "good": False}]
    examples, _ = load(tmp_path, records, entry, stage="kto")
    assert [example.label for example in examples] == [True, False]


def test_trl_strings(tmp_path):
    records = [{"prompt": "2+2?", "completion": "4", "label": True},
               {"prompt": "2+2?", "completion": "5", "label": False}]
    examples, _ = load(tmp_path, records, {"formatting": "trl"}, stage="kto")
    assert [pairs(example) for example in examples] == [
        [("user", "2+2?"), ("assistant", "4")], [("user", "2+2?"), ("assistant", "5")]]
    assert [example.label for example in examples] == [True, False]


def test_trl_message_lists_and_tool_calls(tmp_path):
    record = {
        "prompt": [{"role": "system", "content": "S"}, user("Weather?")],
        "completion": [
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "content": "18C"},
            assistant("18C in Paris."),
        ],
        "label": True,
        "tools": TOOLS,
    }
    [example], _ = load(tmp_path, [record], {"formatting": "trl"}, stage="kto")
    assert [role for role, _ in pairs(example)] == [
        "system", "user", "function_call", "observation", "assistant"]
    assert json.loads(example.messages[2].content) == {"name": "get_weather",
                                                       "arguments": {"city": "Paris"}}
    assert example.tools == TOOLS and example.label is True


def test_trl_messages_column_and_sft_without_label(tmp_path):
    records = [{"messages": [user("hi"), assistant("yo")]}]
    [example], _ = load(tmp_path, records, {"formatting": "trl"})
    assert pairs(example) == [("user", "hi"), ("assistant", "yo")] and example.label is None


def test_nemo_kto_jsonl(tmp_path):
    records = [{"prompt": "Q1", "response": "good", "preference": "chosen"},
               {"prompt": "Q1", "response": "bad", "preference": "rejected"}]
    examples, skipped = load(tmp_path, records, {"formatting": "nemo"}, file_name="kto.jsonl",
                             stage="kto")
    assert skipped == []
    assert [example.label for example in examples] == [True, False]
    assert pairs(examples[1]) == [("user", "Q1"), ("assistant", "bad")]
    assert examples[1].origin.endswith("kto.jsonl#1")


@pytest.mark.parametrize(
    "record, roles",
    [
        ({"prompt": "p", "completion": "c", "label": True}, ["user", "assistant"]),
        ({"prompt": "p", "response": "r", "preference": "chosen"}, ["user", "assistant"]),
        ({"instruction": "i", "input": "", "output": "o", "label": True}, ["user", "assistant"]),
        ({"messages": [user("u"), assistant("a")], "label": True}, ["user", "assistant"]),
        ({"conversations": [human("u"), gpt("a")], "label": True, "system": "S"},
         ["system", "user", "assistant"]),
    ],
    ids=["trl", "nemo", "alpaca", "messages", "sharegpt"],
)
def test_format_detection_for_a_dataset_named_by_path(tmp_path, record, roles):
    [example], _ = load(tmp_path, [record], None, file_name="auto.jsonl", stage="kto")
    assert [message.role for message in example.messages] == roles
    assert example.label is True
    assert example.dataset == "auto.jsonl"


def test_detection_for_an_entry_without_formatting_or_columns(tmp_path):
    records = [{"prompt": "p", "completion": "c", "label": False}]
    [example], _ = load(tmp_path, records, {}, stage="kto")
    assert pairs(example) == [("user", "p"), ("assistant", "c")] and example.label is False


def test_folder_of_jsonl_files_in_sorted_order(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_records(folder / "b.jsonl", [{"prompt": "b0", "completion": "x"}])
    write_records(folder / "a.jsonl", [{"prompt": "a0", "completion": "x"},
                                       {"prompt": "a1", "completion": "x"}])
    (folder / "_SUCCESS").write_text("")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"parts": {"file_name": "parts"}}))
    [spec] = resolve_datasets(str(tmp_path), ["parts"])
    examples, _ = load_examples(spec, str(tmp_path), stage="sft")
    assert [example.messages[0].content for example in examples] == ["a0", "a1", "b0"]
    assert [example.origin for example in examples] == [
        os.path.join(str(folder), "a.jsonl") + "#0", os.path.join(str(folder), "a.jsonl") + "#1",
        os.path.join(str(folder), "b.jsonl") + "#0"]


def test_folder_with_mixed_extensions_is_rejected(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.csv").write_text("x\n1\n")
    with pytest.raises(UserError, match=r"mixes .*a.jsonl and .*b.csv"):
        data_files(str(tmp_path))


def test_parquet_with_nested_messages(tmp_path):
    records = [{"messages": [user("hi"), assistant("there")], "label": True},
               {"messages": [user("hi"), assistant("go away")], "label": False}]
    examples, _ = load(tmp_path, records, KTO_SHAREGPT_ENTRY, file_name="d.parquet", stage="kto")
    assert [pairs(example)[1] for example in examples] == [("assistant", "there"),
                                                            ("assistant", "go away")]
    assert [example.label for example in examples] == [True, False]


def test_csv_with_boolean_labels(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion,label\nq,a,true\nq,b,false\n")
    [spec] = resolve_datasets(str(tmp_path), ["d.csv"])
    examples, _ = load_examples(spec, str(tmp_path), stage="kto")
    assert [(pairs(example)[1][1], example.label) for example in examples] == [("a", True),
                                                                               ("b", False)]


def test_json_file_holding_json_lines(tmp_path):
    (tmp_path / "d.json").write_text('{"prompt": "a", "completion": "b"}\n'
                                     '{"prompt": "c", "completion": "d"}\n')
    [spec] = resolve_datasets(str(tmp_path), ["d.json"])
    examples, _ = load_examples(spec, str(tmp_path), stage="sft")
    assert [pairs(example)[0][1] for example in examples] == ["a", "c"]


def test_empty_system_message_is_dropped(tmp_path):
    record = {"conversations": [{"from": "system", "value": ""}, human("a"), gpt("b")]}
    [example], _ = load(tmp_path, [record], {"formatting": "sharegpt"})
    assert pairs(example) == [("user", "a"), ("assistant", "b")]


def test_example_round_trips_through_json(tmp_path):
    record = {"conversations": [human("a"), {"from": "function_call", "value": CALL},
                                {"from": "observation", "value": "r"}, gpt("b")],
              "tools": TOOLS}
    [example], _ = load(tmp_path, [record], TOOL_ENTRY)
    assert Example.from_json(example.to_json()) == example
    assert example.messages[1] == Message("function_call", CALL)


# ----------------------------------------------------------------------------------------------
# Malformed records: (entry, good record, bad record, stage, field, substrings of the message)

SHAREGPT_OK = {"conversations": [human("a"), gpt("b")]}
KTO_OK = {"messages": [user("a"), assistant("b")], "label": True}
TOOL_OK = {"conversations": [human("a"), gpt("b")], "tools": "[]"}
ALPACA_OK = {"instruction": "a", "input": "", "output": "b"}
NEMO_OK = {"prompt": "a", "response": "b", "preference": "chosen"}
TRL_OK = {"prompt": "a", "completion": "b", "label": True}
SHAREGPT = {"formatting": "sharegpt"}

MALFORMED = {
    "order_two_users": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [human("a"), human("b"), gpt("c")]}, "sft",
        "conversations[1].from",
        ['turn 1 has role "human" (user)', "an assistant or function_call turn was expected"]),
    "order_starts_with_assistant": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [gpt("a"), human("b")]}, "sft",
        "conversations[0].from", ['turn 0 has role "gpt" (assistant)', "must be a user turn"]),
    "order_system_not_first": (
        SHAREGPT, SHAREGPT_OK,
        {"conversations": [human("a"), {"from": "system", "value": "s"}, gpt("b")]}, "sft",
        "conversations[1].from", ["turn 1", "a system turn may only come first"]),
    "unknown_role": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [human("a"), {"from": "bot", "value": "b"}]},
        "sft", "conversations[1].from", ['unknown role "bot"', '"gpt"', '"tags"']),
    "role_content_without_tags": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [user("a"), assistant("b")]}, "sft",
        "conversations[0].from", ["missing", '"role_tag": "role"']),
    "label_not_boolean": (
        KTO_SHAREGPT_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")], "label": "yes"},
        "kto", "label",
        ['expected true or false, got "yes". KTO labels are booleans (true = desirable).']),
    "label_string_true": (
        KTO_SHAREGPT_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")], "label": "true"},
        "kto", "label", ['the string "true"', "not a boolean", "write true without quotes"]),
    "label_number": (
        KTO_SHAREGPT_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")], "label": 1},
        "kto", "label", ["expected true or false, got 1"]),
    "label_missing_for_kto": (
        KTO_SHAREGPT_ENTRY, KTO_OK, {"messages": [user("a"), assistant("b")]}, "kto", "label",
        ["missing", "Stage kto needs a label on every record"]),
    "label_missing_trl": (
        {"formatting": "trl"}, TRL_OK, {"prompt": "a", "completion": "b"}, "kto", "label",
        ["missing", "Stage kto"]),
    "nemo_preference": (
        {"formatting": "nemo"}, NEMO_OK, {"prompt": "a", "response": "b", "preference": "good"},
        "kto", "preference", ['expected "chosen" or "rejected", got "good"']),
    "empty_content": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [human("a"), gpt("   ")]}, "sft",
        "conversations[1].value", ["empty content in the assistant turn"]),
    "non_string_content": (
        SHAREGPT, SHAREGPT_OK, {"conversations": [human(42), gpt("b")]}, "sft",
        "conversations[0].value", ["expected a non-empty string, got a number 42"]),
    "function_call_not_json": (
        TOOL_ENTRY, TOOL_OK,
        {"conversations": [human("a"), {"from": "function_call", "value": "get_weather(Paris)"},
                           {"from": "observation", "value": "r"}, gpt("b")]}, "sft",
        "conversations[1].value", ["function_call turn must hold a JSON object", "invalid JSON"]),
    "function_call_without_name": (
        TOOL_ENTRY, TOOL_OK,
        {"conversations": [human("a"), {"from": "function_call", "value": '{"arguments": {}}'},
                           {"from": "observation", "value": "r"}, gpt("b")]}, "sft",
        "conversations[1].value", ['needs a "name"']),
    "tools_object": (
        TOOL_ENTRY, TOOL_OK, {"conversations": [human("a"), gpt("b")], "tools": TOOLS[0]}, "sft",
        "tools", ["expected a JSON list of tool definitions, got a single object", "[ ]"]),
    "tools_invalid_json": (
        TOOL_ENTRY, TOOL_OK, {"conversations": [human("a"), gpt("b")], "tools": "[{"}, "sft",
        "tools", ["invalid JSON"]),
    "tools_number": (
        TOOL_ENTRY, TOOL_OK, {"conversations": [human("a"), gpt("b")], "tools": 3}, "sft",
        "tools", ["expected a JSON list of tool definitions, got a number"]),
    "kto_ends_with_user": (
        KTO_SHAREGPT_ENTRY, KTO_OK,
        {"messages": [user("a"), assistant("b"), user("c")], "label": True}, "kto",
        "messages[2].role", ['the last turn is "user" (user)', "KTO rates the last assistant"]),
    "sft_ends_with_observation": (
        TOOL_ENTRY, TOOL_OK,
        {"conversations": [human("a"), {"from": "function_call", "value": CALL},
                           {"from": "observation", "value": "r"}]}, "sft",
        "conversations[2].from", ['the last turn is "observation"', "end it with an assistant"]),
    "empty_conversation": (
        SHAREGPT, SHAREGPT_OK, {"conversations": []}, "sft", "conversations",
        ["the conversation is empty"]),
    "missing_messages_column": (
        SHAREGPT, SHAREGPT_OK, {"dialog": [human("a"), gpt("b")]}, "sft", "conversations",
        ["missing", 'map "messages" under "columns"']),
    "missing_alpaca_output": (
        {}, ALPACA_OK, {"instruction": "a", "input": ""}, "sft", "output",
        ["missing", "alpaca response column"]),
    "missing_instruction_detected": (
        None, TRL_OK, {"question": "a", "answer": "b"}, "sft", "prompt",
        ["missing", "detected as trl"]),
    "missing_alpaca_column_with_columns": (
        {"columns": {"prompt": "q", "response": "a"}}, {"q": "x", "a": "y"}, {"q": "x"}, "sft",
        "a", ["missing", "alpaca response column"]),
    "alpaca_bad_history": (
        ALPACA_FULL_ENTRY, ALPACA_OK, {**ALPACA_OK, "history": [["only one"]]}, "sft",
        "history[0]", ["expected an [instruction, response] pair"]),
    "alpaca_empty_prompt": (
        ALPACA_FULL_ENTRY, ALPACA_OK, {"instruction": "", "input": "", "output": "b"}, "sft",
        "instruction/input", ["empty content in the user turn"]),
    "trl_unknown_role": (
        {"formatting": "trl"}, TRL_OK,
        {"prompt": [{"role": "human", "content": "a"}], "completion": "b", "label": True}, "kto",
        "prompt[0].role", ['unknown role "human"']),
    "trl_completion_not_text": (
        {"formatting": "trl"}, TRL_OK, {"prompt": "a", "completion": 5, "label": True}, "kto",
        "completion", ["expected a string or a list"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_raises_with_file_record_and_field(tmp_path, case):
    entry, good, bad, stage, field, fragments = MALFORMED[case]
    with pytest.raises(UserError) as caught:
        load(tmp_path, [good, bad, good], entry, stage=stage)
    message = str(caught.value)
    data_path = os.path.join(str(tmp_path), "data.json")
    assert message.startswith(f'{data_path}: record 1: field "{field}": '), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_is_skipped_on_request(tmp_path, case):
    entry, good, bad, stage, field, _ = MALFORMED[case]
    examples, skipped = load(tmp_path, [good, bad, good, bad], entry, stage=stage,
                             on_bad_record="skip")
    data_path = os.path.join(str(tmp_path), "data.json")
    assert [example.origin for example in examples] == [f"{data_path}#0", f"{data_path}#2"]
    assert [record.index for record in skipped] == [1, 3]
    assert [record.origin for record in skipped] == [f"{data_path}#1", f"{data_path}#3"]
    assert all(record.field == field for record in skipped)
    assert skipped[1].reason.startswith(f'{data_path}: record 3: field "{field}"')


def test_label_message_matches_the_documented_format(tmp_path):
    with pytest.raises(UserError) as caught:
        load(tmp_path, [{**KTO_OK, "label": "yes"}], KTO_SHAREGPT_ENTRY, file_name="kto.json",
             stage="kto")
    assert str(caught.value) == (
        f'{os.path.join(str(tmp_path), "kto.json")}: record 0: field "label": expected true or '
        f'false, got "yes". KTO labels are booleans (true = desirable).')


def test_labels_are_checked_but_optional_for_sft(tmp_path):
    records = [{"prompt": "a", "completion": "b"},
               {"prompt": "a", "completion": "b", "label": True}]
    examples, _ = load(tmp_path, records, {"formatting": "trl"}, stage="sft")
    assert [example.label for example in examples] == [None, True]
    with pytest.raises(UserError, match=r'record 0: field "label": expected true or false'):
        load(tmp_path, [{"prompt": "a", "completion": "b", "label": "no"}], {"formatting": "trl"})


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(UserError, match=r"data.json: record 1: expected a JSON object .* a list"):
        load(tmp_path, [TRL_OK, ["a", "b"]], {"formatting": "trl"}, stage="kto")


# ----------------------------------------------------------------------------------------------
# Broken files


def test_corrupt_jsonl_line_names_the_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps(TRL_OK) + "\n\n" + '{"prompt": "a", "completion": }\n' + json.dumps(TRL_OK)
        + "\n")
    [spec] = resolve_datasets(str(tmp_path), ["d.jsonl"])
    with pytest.raises(UserError) as caught:
        load_examples(spec, str(tmp_path), stage="kto")
    message = str(caught.value)
    assert message.startswith(os.path.join(str(tmp_path), "d.jsonl") + ": record 1 (line 3)")
    assert "invalid JSON" in message and "column 31" in message
    with pytest.raises(UserError, match=r"record 1 \(line 3\)"):
        read_records(str(tmp_path / "d.jsonl"))

    examples, skipped = load_examples(spec, str(tmp_path), stage="kto", on_bad_record="skip")
    assert len(examples) == 2 and [record.index for record in skipped] == [1]
    assert "line 3" in skipped[0].reason


def test_corrupt_json_names_line_and_column(tmp_path):
    (tmp_path / "d.json").write_text('[\n  {"prompt": "a",\n   "completion": "b",}\n]\n')
    [spec] = resolve_datasets(str(tmp_path), ["d.json"])
    with pytest.raises(UserError) as caught:
        load_examples(spec, str(tmp_path), stage="sft")
    assert str(caught.value).startswith(
        os.path.join(str(tmp_path), "d.json") + ": invalid JSON at line 3, column 22")


@pytest.mark.parametrize(
    "file_name, content, expected",
    [
        ("d.json", '{\n "a": 1\n}', r"one JSON object, but a dataset is a JSON list"),
        ("d.json", "[]", r"d.json: no records"),
        ("d.txt", "hello", r"plain-text files hold pre-training data"),
        ("d.xml", "<a/>", r'cannot read files of type ".xml"'),
        ("d.parquet", "not parquet", r"cannot read it as Parquet"),
    ],
)
def test_unreadable_files(tmp_path, file_name, content, expected):
    (tmp_path / file_name).write_text(content)
    spec = DatasetSpec(name="x", file_name=file_name)
    with pytest.raises(UserError, match=expected):
        load_examples(spec, str(tmp_path), stage="sft")


def test_bad_arguments_are_programming_errors(tmp_path):
    spec = DatasetSpec(name="x", file_name="d.json")
    with pytest.raises(ValueError):
        load_examples(spec, str(tmp_path), stage="dpo")
    with pytest.raises(ValueError):
        load_examples(spec, str(tmp_path), stage="sft", on_bad_record="ignore")


def test_100k_records_load_quickly(tmp_path):
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as handle:
        for index in range(100_000):
            handle.write(json.dumps({"conversations": [human(f"question {index}"),
                                                       gpt(f"answer {index}"), human("more"),
                                                       gpt("done")], "label": index % 2 == 0})
                         + "\n")
    spec = DatasetSpec(name="big", file_name="big.jsonl")
    start = time.perf_counter()
    examples, skipped = load_examples(spec, str(tmp_path), stage="kto")
    elapsed = time.perf_counter() - start
    assert len(examples) == 100_000 and skipped == []
    assert sum(example.label for example in examples) == 50_000
    assert elapsed < 10, f"loading 100k records took {elapsed:.1f}s"
