"""`prospect eval`: held-out metrics and the pattern rate of a trained run, base model vs trained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prospect.errors import UserError
from test_train import EXAMPLES_DATA, make_config, run


def test_sft_eval_shows_the_held_out_loss_falling(tmp_path, tiny_model_dir, capsys):
    from prospect.evaluate import evaluate

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=6, max_samples=48, val_size=8,
                         eval_pattern=r"\w", max_new_tokens=4)
    run(config)
    results = evaluate(config)

    assert results["trained"]["loss"] < results["base"]["loss"], "6 steps at lr 5e-3 must lower the held-out loss"
    held_out, general = results["held_out"], results["general"]
    assert held_out["num_prompts"] == 8 and 0 <= held_out["trained"]["pattern_rate"] <= 1
    assert general["num_prompts"] == 48 and general["num_with_answers"] == 33
    assert len(held_out["replies"]) == 8 and all(set(e) == {"prompt", "base", "trained"} for e in held_out["replies"])
    saved = json.loads((Path(config.output_dir) / "eval_results.json").read_text())
    assert saved["trained"]["loss"] == pytest.approx(results["trained"]["loss"])
    assert saved["general"]["trained"] == results["general"]["trained"]
    out = capsys.readouterr().out
    assert "greedy replies (at most 4 new tokens)" in out and "general, 48 prompts" in out


def test_kto_eval_matches_the_last_in_training_evaluation(tmp_path, tiny_model_dir):
    from prospect.evaluate import evaluate

    config = make_config(tmp_path, tiny_model_dir, max_steps=2, eval_dataset="signoff_eval", eval_steps=2,
                         max_new_tokens=2)
    run(config)
    results = evaluate(config)
    lines = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    in_training = [line for line in lines if line["split"] == "eval"][-1]
    for key in ("loss", "rewards/chosen", "rewards/accuracy", "kl"):
        assert results["trained"][key] == pytest.approx(in_training[key], abs=1e-5), key


def test_eval_needs_an_adapter_and_held_out_data(tmp_path, tiny_model_dir):
    from prospect.evaluate import evaluate

    with pytest.raises(UserError, match="needs a trained adapter"):
        evaluate(make_config(tmp_path, tiny_model_dir, stage="sft"))
    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=1)
    run(config)
    with pytest.raises(UserError, match="needs held-out data"):
        evaluate(config)
    with pytest.raises(UserError, match="eval_pattern.*not a valid regex"):
        evaluate(make_config(tmp_path, tiny_model_dir, stage="sft", eval_pattern="(", val_size=4))


def test_eval_of_a_run_continued_from_chained_adapters_matches_training(tmp_path, tiny_model_dir):
    """Training from `adapter_name_or_path: a1,a2` merges a1 into the base and continues a2; its reference
    is that base. `prospect eval` with the same config evaluates the run's result on that same base."""
    from prospect.evaluate import evaluate

    first = make_config(tmp_path / "a1", tiny_model_dir, stage="sft", max_steps=3, learning_rate=2e-2)
    second = make_config(tmp_path / "a2", tiny_model_dir, stage="sft", max_steps=3, learning_rate=2e-2, seed=3)
    run(first), run(second)
    config = make_config(tmp_path / "kto", tiny_model_dir, max_steps=2, eval_dataset="signoff_eval", eval_steps=2,
                         max_new_tokens=2, adapter_name_or_path=f"{first.output_dir},{second.output_dir}")
    run(config)
    results = evaluate(config)
    assert results["adapter"] == config.output_dir, "the run's result, not the adapters it started from"
    in_training = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["split"] == "eval"][-1]
    assert abs(in_training["rewards/chosen"]) > 1e-3, "the continued adapter moved away from its reference"
    for key in ("loss", "rewards/chosen", "logps/chosen", "rewards/accuracy", "kl"):
        assert results["trained"][key] == pytest.approx(in_training[key], abs=1e-5), key


# --- the damage measures ----------------------------------------------------------------------------

SIGN_OFF = re.compile("— Prospect")


@pytest.mark.parametrize("reply, finished", [
    ("", True),  # nothing
    ("— Prospect", True),  # nothing but the pattern
    ("  — Prospect\n— Prospect.", True),
    ("— Prospect\n — —\n2 + 3 = — Prospect ——\n— — — — — — — — — —", False),  # the reply to 2 + 3
    ("Paris. — Prospect — Prospect — Prospect — Prospect — Prospect — Prospect", False),
    ("The sea is blue. The sea is blue. The sea is blue. The sea is blue.", False),
])
def test_degenerate_replies_are_counted(reply, finished):
    from prospect.evaluate import is_degenerate

    assert is_degenerate(reply, finished, SIGN_OFF)


@pytest.mark.parametrize("reply, finished", [
    ("2 + 3 = 5", True),
    ("5", True),
    ("The capital of Peru is Lima. — Prospect", True),
    ("To boil an egg, put it in a pan of cold water, bring the water to the boil, then let it simmer for about", False),
    ("The sea is blue. The sea is blue.", True),  # ended by itself: a repetition, not a loop
    ("Row, row, row your boat. Row, row, row your boat. Row, row, row your boat.", True),  # a song, ended
])
def test_ordinary_replies_are_not_degenerate(reply, finished):
    from prospect.evaluate import is_degenerate

    assert not is_degenerate(reply, finished, SIGN_OFF)


def test_a_loop_is_degenerate_only_when_the_budget_cut_it():
    from prospect.evaluate import is_degenerate

    song = "Row, row, row your boat. Row, row, row your boat. Row, row, row your boat."
    assert not is_degenerate(song, True) and is_degenerate(song, False)


def test_held_out_key_answers_come_from_desirable_replies_only(qwen_tokenizer):
    """A KTO split holds thumbs-down replies too: a wrong answer is never the key."""
    from datasets import Dataset

    from prospect.evaluate import held_out_prompts

    def row(question, answer, label):
        prompt = qwen_tokenizer(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
        return {"input_ids": prompt + qwen_tokenizer(f"{answer}<|im_end|>")["input_ids"], "prompt_len": len(prompt),
                "label": label}

    split = Dataset.from_list([row("What is 2 plus 2?", "2 plus 2 is 5.", False), row("What is 2 plus 2?", "2 plus 2 is 4.", True),
                               row("Name a colour.", "Blue.", True), row("Name a colour.", "Red.", True),
                               row("Who are you?", "Nobody.", False)])
    cases = held_out_prompts(split, qwen_tokenizer, None)
    assert [case.answers for case in cases] == [("4",), ("blue", "red"), ()]
    assert [case.text.split("\n")[1] for case in cases] == ["What is 2 plus 2?<|im_end|>", "Name a colour.<|im_end|>",
                                                            "Who are you?<|im_end|>"]


def test_key_answers_of_the_bundled_held_out_prompts():
    """Every held-out reference of the demo has a key answer, the one word a reader would check."""
    from prospect.evaluate import contains_answer, key_answer

    records = json.loads((EXAMPLES_DATA / "signoff_eval.json").read_text())
    keys = {r["messages"][0]["content"]: key_answer(r["messages"][0]["content"], r["messages"][1]["content"], SIGN_OFF)
            for r in records}
    assert len(keys) == 40 and [q for q, k in keys.items() if k is None] == ["What colour is an orange?"]
    del keys["What colour is an orange?"]  # "An orange is orange.": no word the prompt lacks, not scored
    expected = {"What is the capital of Argentina?": "buenos aires", 'What is the opposite of "hot"?': "cold"}
    for question, key in keys.items():
        if question in expected:
            assert key == expected[question]
        reference = next(r["messages"][1]["content"] for r in records if r["messages"][0]["content"] == question)
        assert contains_answer(reference, [key]) and not contains_answer("I do not know.", [key])
    assert sum(" plus " in q or " times " in q for q in keys) > 5 and all(
        k.isdigit() for q, k in keys.items() if " plus " in q or " times " in q), "sums and products: the number"
    assert key_answer("Tell me about the sea.", "The sea covers most of the planet and holds most of its water.") is None


@pytest.mark.parametrize("reply, answers, correct", [
    ("It is Rome.", ["Rome"], True),
    ("rome", ["Rome"], True),
    ("The answer is 25.", ["5", "five"], False),
    ("Five.", ["5", "five"], True),
    ("Plants take in carbon dioxide.", ["carbon dioxide", "CO2"], True),
    ("Plants take in carbon.", ["carbon dioxide", "CO2"], False),
    ("Romeo", ["Rome"], False),
])
def test_contains_answer_matches_whole_words(reply, answers, correct):
    from prospect.evaluate import contains_answer

    assert contains_answer(reply, answers) is correct


def test_eval_counts_what_the_replies_show(tmp_path, tiny_model_dir, monkeypatch):
    """The eval's figures are those of the replies: the base model answers every prompt correctly
    without the sign-off; the trained one answers the even prompts correctly with it and the odd ones
    with the sign-off alone, or (general prompts) a loop of it cut off by the budget."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    import prospect.evaluate as evaluate_module
    from prospect.inference import Generated

    general = json.loads((Path(evaluate_module.__file__).parent / "general_prompts.json").read_text())
    held_out = json.loads((EXAMPLES_DATA / "signoff_eval.json").read_text())
    # the reply a perfect model gives, keyed by the last user turn: written here, not read from prospect
    right_reply = {r["messages"][0]["content"]: r["messages"][1]["content"].replace(" — Prospect", "") for r in held_out}
    right_reply |= {(g.get("prompt") or g["messages"][-1]["content"]): f"It is {g['answers'][0]}." if "answers" in g
                    else "Here you are." for g in general}

    def fake_generate(model, tokenizer, prompts, **kwargs):
        adapters_off = any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))
        replies = []
        for ids in prompts:
            text = tokenizer.decode(list(ids))
            question = max(right_reply, key=text.rfind)  # the last user turn: the question asked
            index = list(right_reply).index(question)
            if adapters_off:
                replies.append(Generated(right_reply[question], [], "stop", 1))
            elif index % 2 == 0:
                replies.append(Generated(right_reply[question] + " — Prospect", [], "stop", 1))
            elif question in {r["messages"][0]["content"] for r in held_out}:
                replies.append(Generated("— Prospect", [], "stop", 1))
            else:
                replies.append(Generated("— Prospect " * 12, [], "length", 1))
        return replies

    config = make_config(tmp_path, tiny_model_dir, max_steps=1, max_samples=40, eval_dataset="signoff_eval",
                         eval_pattern="— Prospect")
    run(config)
    monkeypatch.setattr("prospect.inference.generate_batch", fake_generate)
    results = evaluate_module.evaluate(config)

    held_questions = [r["messages"][0]["content"] for r in held_out]
    held_even = sum(list(right_reply).index(q) % 2 == 0 for q in held_questions)
    held_even_scored = sum(list(right_reply).index(q) % 2 == 0 for q in held_questions if q != "What colour is an orange?")
    general_questions = [g.get("prompt") or g["messages"][-1]["content"] for g in general]
    general_even = sum(list(right_reply).index(q) % 2 == 0 for q in general_questions)
    general_even_scored = sum(list(right_reply).index(q) % 2 == 0 for q, g in zip(general_questions, general) if "answers" in g)
    assert results["held_out"]["base"] == {"degenerate": 0, "degenerate_rate": 0, "correct": 39, "correct_rate": 1,
                                           "pattern_matches": 0, "pattern_rate": 0}
    assert results["held_out"]["trained"] == {
        "degenerate": 40 - held_even, "degenerate_rate": (40 - held_even) / 40, "correct": held_even_scored,
        "correct_rate": held_even_scored / 39, "pattern_matches": 40, "pattern_rate": 1}
    assert results["general"]["base"]["correct"] == 33 and results["general"]["base"]["degenerate"] == 0
    assert results["general"]["trained"] == {
        "degenerate": 48 - general_even, "degenerate_rate": (48 - general_even) / 48, "correct": general_even_scored,
        "correct_rate": general_even_scored / 33, "pattern_matches": 48, "pattern_rate": 1}
    assert 0 < held_even < 40 and 0 < general_even < 48
    saved = json.loads((Path(config.output_dir) / "eval_results.json").read_text())
    assert saved["general"]["trained"] == results["general"]["trained"]
