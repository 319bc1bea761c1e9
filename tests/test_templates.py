"""Named and "auto" templates against the official chat templates of the real tokenizers."""

from __future__ import annotations

import json
import pickle
import types

import pytest

from prospect.data.example import Message
from prospect.data.templates import JinjaTemplate, get_template
from prospect.data.tool_calls import to_hf_messages, to_hf_tools
from prospect.errors import UserError

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "function_call": "function_call", "observation": "observation"}


def conversation(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in turns]


CONVERSATIONS = {
    "single_turn": conversation(("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4.")),
    "multi_turn": conversation(
        ("user", "Name a prime number."),
        ("assistant", "7 is prime."),
        ("user", "And an even one?"),
        ("assistant", "2 is the only even prime."),
        ("user", "Thanks!"),
        ("assistant", "You're welcome."),
    ),
    "system_single_turn": conversation(
        ("system", "You answer in French."), ("user", "Hello"), ("assistant", "Bonjour !")
    ),
    "system_multi_turn": conversation(
        ("system", "Be brief."),
        ("user", "Capital of Italy?"),
        ("assistant", "Rome."),
        ("user", "Of Spain?"),
        ("assistant", "Madrid."),
    ),
    # Surrounding whitespace (Llama-3 trims it), a content starting with a newline (merges with the
    # header's newline in BPE), non-ASCII text.
    "whitespace_unicode": conversation(
        ("user", "  Grüße — 日本語で答えて?  \n"),
        ("assistant", "\n\nはい、もちろん。 Ça va ?  "),
        ("user", "\tOk"),
        ("assistant", " leading space"),
    ),
}

# (tokenizer fixture, named template, default_system): the named template must equal that tokenizer's own.
MODEL_TEMPLATES = [
    ("qwen_tokenizer", "qwen", None),
    ("llama3_tokenizer", "llama3", None),
    ("smollm_tokenizer", "chatml", SMOLLM_SYSTEM),
]


def official_ids(tokenizer, hf_messages, tools=None, add_generation_prompt=False) -> list[int]:
    """Token ids of the tokenizer's own chat template (transformers 5 returns a BatchEncoding)."""
    result = tokenizer.apply_chat_template(
        hf_messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    ids = result["input_ids"] if hasattr(result, "keys") else result
    assert ids and isinstance(ids[0], int)
    return list(ids)


def official_text(tokenizer, hf_messages, tools=None, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        hf_messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def glaive_example(record: dict) -> tuple[list[Message], list[dict]]:
    messages = [Message(SHAREGPT_ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]
    return messages, json.loads(record["tools"])


# --------------------------------------------------------------------------------------------------
# Parity with the official templates


@pytest.mark.parametrize("mode", ["named", "auto"])
@pytest.mark.parametrize("tokenizer_fixture,template_name,default_system", MODEL_TEMPLATES)
@pytest.mark.parametrize("conversation_name", sorted(CONVERSATIONS))
def test_template_matches_official_chat_template(
    request, tokenizer_fixture, template_name, default_system, conversation_name, mode
):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    template = get_template(template_name if mode == "named" else "auto", tokenizer, default_system)
    messages = CONVERSATIONS[conversation_name]
    hf_messages = to_hf_messages(messages)

    full = template.render(messages)
    assert full.text == official_text(tokenizer, hf_messages)
    assert token_ids(tokenizer, full.text) == official_ids(tokenizer, hf_messages)

    # The prompt of the last turn, as used for generation and for KTO.
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    assert prompt.text == official_text(tokenizer, hf_messages[:-1], add_generation_prompt=True)
    assert token_ids(tokenizer, prompt.text) == official_ids(tokenizer, hf_messages[:-1], add_generation_prompt=True)
    assert full.text.startswith(prompt.text)
    assert full.trained_spans[-1].start == len(prompt.text)


@pytest.mark.parametrize("mode", ["named", "auto"])
def test_qwen_tool_calls_match_official_template_on_glaive(qwen_tokenizer, glaive_records, mode):
    template = get_template("qwen" if mode == "named" else None, qwen_tokenizer)
    records = glaive_records[:50]
    assert sum(bool(json.loads(r["tools"])) for r in records) >= 20  # the sample does exercise tools
    for index, record in enumerate(records):
        messages, tools = glaive_example(record)
        hf_messages, hf_tools = to_hf_messages(messages), to_hf_tools(tools) or None
        rendered = template.render(messages, tools)
        assert rendered.text == official_text(qwen_tokenizer, hf_messages, hf_tools), f"record {index}"
        assert token_ids(qwen_tokenizer, rendered.text) == official_ids(qwen_tokenizer, hf_messages, hf_tools)


def test_qwen_named_text_matches_official_on_all_glaive_records_and_auto_spans_agree(qwen_tokenizer, glaive_records):
    named, auto = get_template("qwen", qwen_tokenizer), get_template("auto", qwen_tokenizer)
    for index, record in enumerate(glaive_records):
        messages, tools = glaive_example(record)
        rendered = named.render(messages, tools)
        assert rendered.text == official_text(qwen_tokenizer, to_hf_messages(messages), to_hf_tools(tools) or None)
        if index < 50:
            assert auto.render(messages, tools) == rendered, f"record {index}"


def test_qwen_parallel_calls_grouped_observations_and_string_arguments(qwen_tokenizer):
    tools = [
        {"name": "get_weather", "description": "Wetter für eine Stadt", "parameters": {"type": "object"}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    calls = [
        {"name": "get_weather", "arguments": {"city": "Zürich"}},
        {"name": "get_time", "arguments": '{"tz": "Europe/Zurich"}'},  # arguments as a JSON string
    ]
    messages = conversation(
        ("system", "You are a travel assistant."),
        ("user", "Weather and time in Zürich?"),
        ("function_call", json.dumps(calls)),
        ("observation", '{"temp_c": 21}'),
        ("observation", '{"time": "14:05"}'),
        ("assistant", "21 °C, and it is 14:05."),
    )
    hf_messages, hf_tools = to_hf_messages(messages), to_hf_tools(tools)
    assert hf_messages[2]["tool_calls"][1]["function"]["arguments"] == {"tz": "Europe/Zurich"}
    for template in (get_template("qwen", qwen_tokenizer), get_template("auto", qwen_tokenizer)):
        rendered = template.render(messages, tools)
        assert rendered.text == official_text(qwen_tokenizer, hf_messages, hf_tools)
        assert token_ids(qwen_tokenizer, rendered.text) == official_ids(qwen_tokenizer, hf_messages, hf_tools)
        assert rendered.span_texts() == [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Zurich"}}\n</tool_call><|im_end|>',
            "21 °C, and it is 14:05.<|im_end|>",
        ]
        assert '\n{"type": "function", "function": {"name": "get_weather", "description": "Wetter für eine Stadt"' in (
            rendered.text
        )
        # Both observations share one user turn, each in its own <tool_response> block.
        assert rendered.text.count("<|im_start|>user") == 2
        assert (
            '<|im_start|>user\n<tool_response>\n{"temp_c": 21}\n</tool_response>\n'
            '<tool_response>\n{"time": "14:05"}\n</tool_response><|im_end|>\n<|im_start|>assistant\n21 °C'
        ) in rendered.text


# --------------------------------------------------------------------------------------------------
# Trained spans


@pytest.mark.parametrize(
    "template_name,default_system,turn_header,end_of_turn",
    [
        ("qwen", None, "<|im_start|>assistant\n", "<|im_end|>"),
        ("chatml", SMOLLM_SYSTEM, "<|im_start|>assistant\n", "<|im_end|>"),
        ("llama3", None, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ],
)
def test_trained_spans_are_assistant_content_plus_end_of_turn(template_name, default_system, turn_header, end_of_turn):
    template = get_template(template_name, None, default_system)
    assert template.end_of_turn == end_of_turn
    messages = CONVERSATIONS["system_multi_turn"]
    rendered = template.render(messages)
    assert [span.message_index for span in rendered.trained_spans] == [2, 4]
    assert rendered.span_texts() == ["Rome." + end_of_turn, "Madrid." + end_of_turn]
    for span in rendered.trained_spans:
        assert rendered.text[: span.start].endswith(turn_header)  # header excluded
    # Nothing after the end-of-turn token (Qwen/ChatML's newline) is trained.
    assert rendered.text[rendered.trained_spans[-1].end :] in ("", "\n")

    trimmed = template.render(conversation(("user", "hi"), ("assistant", "  spaced out \n")))
    expected = "spaced out" if template_name == "llama3" else "  spaced out \n"  # Llama-3 trims content
    assert trimmed.span_texts() == [expected + end_of_turn]


def test_auto_spans_equal_named_spans(qwen_tokenizer, llama3_tokenizer, smollm_tokenizer):
    for tokenizer, name, system in [
        (qwen_tokenizer, "qwen", None),
        (llama3_tokenizer, "llama3", None),
        (smollm_tokenizer, "chatml", SMOLLM_SYSTEM),
    ]:
        named, auto = get_template(name, tokenizer, system), get_template(None, tokenizer)
        for messages in CONVERSATIONS.values():
            assert auto.render(messages) == named.render(messages), name


def test_default_system_is_used_only_when_the_conversation_has_none(qwen_tokenizer, smollm_tokenizer):
    single, with_system = CONVERSATIONS["single_turn"], CONVERSATIONS["system_single_turn"]
    for template in (get_template("qwen", None, "Custom."), get_template("auto", qwen_tokenizer, "Custom.")):
        assert template.render(single).text.startswith("<|im_start|>system\nCustom.<|im_end|>\n<|im_start|>user")
        assert template.render(with_system).text.startswith("<|im_start|>system\nYou answer in French.<|im_end|>")
    auto_smollm = get_template("auto", smollm_tokenizer, "Custom.")
    assert auto_smollm.render(single).text.startswith("<|im_start|>system\nCustom.<|im_end|>\n<|im_start|>user")
    assert auto_smollm.render(single).trained_spans[0].message_index == 1  # indexes the caller's messages
    assert get_template("qwen", None).render(single).text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>"
    )
    assert get_template("llama3", None).render(single).text.startswith(
        "<|begin_of_text|><|start_header_id|>user"
    )
    assert get_template("chatml", None).render(single).text.startswith("<|im_start|>user")


# --------------------------------------------------------------------------------------------------
# Tools in templates without a native tool format


TOOLS = [{"name": "add", "description": "Add two numbers", "parameters": {"type": "object"}}]
TOOL_CONVERSATION = conversation(
    ("user", "1+2?"),
    ("function_call", '{"name": "add", "arguments": {"a": 1, "b": 2}}'),
    ("observation", "3"),
    ("assistant", "It is 3."),
)
TOOL_CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
# Qwen2.5's tools section for TOOLS, written out by hand from its official template.
TOOLS_SECTION = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "add", "description": "Add two numbers", '
    '"parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def test_chatml_writes_tools_the_qwen_way_with_tool_role():
    rendered = get_template("chatml", None, "Be exact.").render(TOOL_CONVERSATION, TOOLS)
    tools_section = TOOLS_SECTION
    assert rendered.text == (
        "<|im_start|>system\nBe exact.\n\n" + tools_section + "<|im_end|>\n"
        "<|im_start|>user\n1+2?<|im_end|>\n"
        "<|im_start|>assistant\n" + TOOL_CALL_TEXT + "<|im_end|>\n"
        "<|im_start|>tool\n3<|im_end|>\n"
        "<|im_start|>assistant\nIt is 3.<|im_end|>\n"
    )
    assert rendered.span_texts() == [TOOL_CALL_TEXT + "<|im_end|>", "It is 3.<|im_end|>"]
    # Without any system prompt the tools section is the whole system message.
    bare = get_template("chatml", None).render(TOOL_CONVERSATION, TOOLS)
    assert bare.text.startswith("<|im_start|>system\n# Tools\n\n")


def test_llama3_writes_tools_the_qwen_way_with_ipython_role():
    rendered = get_template("llama3", None).render(TOOL_CONVERSATION, TOOLS)
    tools_section = TOOLS_SECTION
    assert rendered.text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + tools_section + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n1+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + TOOL_CALL_TEXT + "<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n3<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 3.<|eot_id|>"
    )
    assert rendered.span_texts() == [TOOL_CALL_TEXT + "<|eot_id|>", "It is 3.<|eot_id|>"]


def test_to_hf_messages_converts_function_calls_and_observations():
    assert to_hf_messages(TOOL_CONVERSATION) == [
        {"role": "user", "content": "1+2?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
        },
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "It is 3."},
    ]
    assert to_hf_tools(TOOLS) == [{"type": "function", "function": TOOLS[0]}]
    assert to_hf_tools(to_hf_tools(TOOLS)) == to_hf_tools(TOOLS)  # already wrapped: unchanged


# --------------------------------------------------------------------------------------------------
# Errors a user can fix


def test_unknown_template_name_lists_known_ones():
    with pytest.raises(UserError) as error:
        get_template("vicuna", None)
    for name in ("auto", "chatml", "llama3", "qwen", "vicuna"):
        assert name in str(error.value)


def test_auto_without_chat_template_asks_for_a_named_template():
    plain_tokenizer = types.SimpleNamespace(chat_template=None, eos_token="</s>")
    with pytest.raises(UserError, match="no chat template.*set `template:`"):
        get_template("auto", plain_tokenizer)


@pytest.mark.parametrize("tokenizer_fixture", ["llama3_tokenizer", "smollm_tokenizer"])
def test_auto_refuses_tools_when_the_chat_template_ignores_them(request, tokenizer_fixture):
    template = get_template(None, request.getfixturevalue(tokenizer_fixture))
    with pytest.raises(UserError, match="ignores tools.*template: qwen"):
        template.render(TOOL_CONVERSATION, TOOLS, origin="glaive.json#3")
    with pytest.raises(UserError, match="glaive.json#3"):  # function calls alone are enough
        template.render(TOOL_CONVERSATION, origin="glaive.json#3")


def test_auto_refuses_a_template_that_does_not_render_prefix_by_prefix(qwen_tokenizer):
    # Starts with the number of messages, so a shorter conversation is not a prefix of a longer one.
    counting = (
        "{{ messages | length }}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    template = JinjaTemplate(qwen_tokenizer, chat_template=counting)
    with pytest.raises(UserError, match="prefix.*qwen, llama3, chatml"):
        template.render(CONVERSATIONS["single_turn"], origin="data.json#0")


@pytest.mark.parametrize(
    "template_name,tokenizer_fixture,missing",
    [("llama3", "qwen_tokenizer", "<|start_header_id|>"), ("chatml", "llama3_tokenizer", "<|im_start|>")],
)
def test_named_template_needs_its_special_tokens(request, template_name, tokenizer_fixture, missing):
    with pytest.raises(UserError, match=f"{template_name}.*{missing}".replace("|", r"\|")):
        get_template(template_name, request.getfixturevalue(tokenizer_fixture))


@pytest.mark.parametrize("content", ["not json", '{"arguments": {}}', "[]", '{"name": "f"}'])
def test_malformed_function_call_names_origin(content):
    messages = conversation(("user", "hi"), ("function_call", content))
    for template in (get_template("qwen", None), get_template("llama3", None)):
        with pytest.raises(UserError, match="data.json#7: a function_call message"):
            template.render(messages, origin="data.json#7")


def test_templates_survive_pickling(smollm_tokenizer):
    """datasets.map(num_proc=N) ships the template (and, for auto, the tokenizer) to worker processes."""
    messages, tools = CONVERSATIONS["multi_turn"], []
    for template in (get_template("qwen", None), get_template("auto", smollm_tokenizer)):
        clone = pickle.loads(pickle.dumps(template))
        assert clone.render(messages, tools) == template.render(messages, tools)


# --------------------------------------------------------------------------------------------------
# One definition, read two ways: our renderer (text + trained spans) against transformers' own
# `apply_chat_template` on the same Jinja, whose `return_assistant_tokens_mask` reads the
# `{% generation %}` blocks with its own code. The exported form (tags removed) renders the same text.

CONTENTS = ["Hi.", "  Grüße — 日本語で答えて?  \n", "Line one.\nLine two.", "", " leading space", "7 is prime.",
            "{\"json\": [1, 2]}", "Tabs\tand trailing  ", "Ça va ?", "a" * 40]


def random_conversation(rng) -> tuple[list[Message], list[dict]]:
    """A seeded conversation: optional system, user/assistant turns, sometimes calls and observations."""
    messages = [Message("system", rng.choice(CONTENTS))] if rng.random() < 0.4 else []
    uses_tools = rng.random() < 0.4
    for _ in range(rng.randint(1, 4)):
        messages.append(Message("user", rng.choice(CONTENTS)))
        if uses_tools and rng.random() < 0.5:
            calls = [{"name": rng.choice(["add", "lookup"]), "arguments": {"a": rng.randint(0, 9), "q": "Zürich"}}
                     for _ in range(rng.randint(1, 2))]
            messages.append(Message("function_call", json.dumps(calls if len(calls) > 1 else calls[0])))
            for _ in range(rng.randint(1, 2)):
                messages.append(Message("observation", rng.choice(['{"result": 3}', "3", "no data"])))
        messages.append(Message("assistant", rng.choice(CONTENTS)))
    return messages, (TOOLS if uses_tools else [])


@pytest.mark.parametrize("template_name,tokenizer_fixture", [("qwen", "qwen_tokenizer"), ("chatml", "qwen_tokenizer"),
                                                             ("llama3", "llama3_tokenizer")])
def test_named_templates_render_alike_in_transformers_with_the_same_trained_tokens(
    request, template_name, tokenizer_fixture
):
    import random

    from prospect.data.templates import chat_template_jinja

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    rng = random.Random(20)
    for default_system in (None, "Be brief."):
        template = get_template(template_name, tokenizer, default_system)
        exported = chat_template_jinja(template)
        assert "generation %}" not in exported and "{%- generation %}" in template.source
        for case in range(150):
            messages, tools = random_conversation(rng)
            rendered = template.render(messages, tools)
            hf_messages, hf_tools = to_hf_messages(messages), to_hf_tools(tools) or None
            assert tokenizer.apply_chat_template(hf_messages, tools=hf_tools, chat_template=exported,
                                                 tokenize=False) == rendered.text, case
            hf = tokenizer.apply_chat_template(hf_messages, tools=hf_tools, chat_template=template.source,
                                               tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            assert list(hf["input_ids"]) == token_ids(tokenizer, rendered.text), case
            # transformers marks every token that overlaps a generation block
            overlaps = [int(any(start < span.end and span.start < end for span in rendered.trained_spans))
                        for start, end in offsets]
            assert list(hf["assistant_masks"]) == overlaps, case
            trained = [i for i, m in enumerate(messages) if m.role in ("assistant", "function_call")]
            assert [span.message_index for span in rendered.trained_spans] == trained, case
