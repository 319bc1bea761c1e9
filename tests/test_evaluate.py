"""`prospect eval`: held-out metrics and the pattern rate of a trained run, base model vs trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prospect.errors import UserError
from test_train import make_config, run


def test_sft_eval_shows_the_held_out_loss_falling(tmp_path, tiny_model_dir, capsys):
    from prospect.evaluate import evaluate

    config = make_config(tmp_path, tiny_model_dir, stage="sft", max_steps=6, max_samples=48, val_size=8,
                         eval_pattern=r"\w", max_new_tokens=4)
    run(config)
    results = evaluate(config)

    assert results["trained"]["loss"] < results["base"]["loss"], "6 steps at lr 5e-3 must lower the held-out loss"
    assert results["num_prompts"] == 8 and 0 <= results["trained"]["pattern_rate"] <= 1
    assert len(results["examples"]) == 3 and all(set(e) == {"prompt", "base", "trained"} for e in results["examples"])
    saved = json.loads((Path(config.output_dir) / "eval_results.json").read_text())
    assert saved["trained"]["loss"] == pytest.approx(results["trained"]["loss"])
    assert "pattern '\\\\w' in greedy replies to 8 prompts" in capsys.readouterr().out


def test_kto_eval_matches_the_last_in_training_evaluation(tmp_path, tiny_model_dir):
    from prospect.evaluate import evaluate

    config = make_config(tmp_path, tiny_model_dir, max_steps=2, eval_dataset="signoff_eval", eval_steps=2)
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
                         adapter_name_or_path=f"{first.output_dir},{second.output_dir}")
    run(config)
    results = evaluate(config)
    assert results["adapter"] == config.output_dir, "the run's result, not the adapters it started from"
    in_training = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["split"] == "eval"][-1]
    assert abs(in_training["rewards/chosen"]) > 1e-3, "the continued adapter moved away from its reference"
    for key in ("loss", "rewards/chosen", "logps/chosen", "rewards/accuracy", "kl"):
        assert results["trained"][key] == pytest.approx(in_training[key], abs=1e-5), key
