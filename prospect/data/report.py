"""What `prospect data check` and `prospect data preview` print, and the KTO class-balance rule."""

from __future__ import annotations

import math
import sys

from prospect.config import RunConfig
from prospect.data.encode import IGNORE_INDEX

MAX_LISTED_SKIPS = 20


def kto_balance(num_desirable: int, num_undesirable: int, chosen_weight: float, rejected_weight: float):
    """The KTO paper's rule: λ_D·n_D / (λ_U·n_U) should lie in [1, 4/3].

    Returns (ratio, suggested_chosen_weight). The suggestion is None when the ratio is in range or a
    class is empty; otherwise it is the smallest λ_D (λ_U kept) that brings the ratio to >= 1.
    """
    if num_desirable == 0 or num_undesirable == 0:
        return (math.inf if num_undesirable == 0 else 0.0), None
    ratio = chosen_weight * num_desirable / (rejected_weight * num_undesirable)
    if 1.0 - 1e-9 <= ratio <= 4.0 / 3.0 + 1e-9:  # tolerance: the suggested weight must pass this check
        return ratio, None
    exact = rejected_weight * num_undesirable / num_desirable
    # Round up to the fewest decimals that stay in range, so the printed weight passes the check.
    suggested = exact
    for decimals in range(2, 13):
        rounded = math.ceil(exact * 10**decimals) / 10**decimals
        if rounded * num_desirable / (rejected_weight * num_undesirable) <= 4.0 / 3.0:
            suggested = rounded
            break
    return ratio, suggested


def balance_advice(config: RunConfig, num_desirable: int, num_undesirable: int) -> str:
    """One line on the KTO label balance, with the weights to use when it is off."""
    ratio, suggested = kto_balance(num_desirable, num_undesirable, config.kto_chosen_weight, config.kto_rejected_weight)
    formula = (f"λD·nD/(λU·nU) = {config.kto_chosen_weight:g}·{num_desirable}/"
               f"({config.kto_rejected_weight:g}·{num_undesirable}) = {ratio:.2f}")
    if num_desirable == 0 or num_undesirable == 0:
        missing = "desirable" if num_desirable == 0 else "undesirable"
        return f"{formula}: no {missing} example; KTO will only learn from the other class."
    if suggested is None:
        return f"{formula} (within [1, 4/3])"
    return (f"{formula}, outside [1, 4/3]: set kto_chosen_weight: {suggested:g} "
            f"(with kto_rejected_weight: {config.kto_rejected_weight:g})")


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(math.ceil(q / 100 * len(sorted_values))) - 1)]


def print_check(config: RunConfig, data, out=None) -> None:
    """Per dataset: examples kept / dropped and why, label balance, token lengths, truncation."""
    out = out or sys.stdout  # looked up per call, so redirected/captured stdout is honoured
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"model {config.model_name_or_path} (tokenizer only) | template {data.template_name} | "
      f"stage {config.stage} | cutoff_len {config.cutoff_len}")
    for r in data.reports:
        p("")
        p(f"dataset {r.name} ({r.split})")
        p(f"  records        {r.num_records} read, {len(r.skipped)} skipped as malformed, "
          f"{r.num_over_max_samples} beyond max_samples")
        dropped = sum(r.dropped.values())
        why = "; ".join(f"{n} {reason}" for reason, n in r.dropped.items())
        p(f"  examples       {r.num_kept} kept, {dropped} dropped" + (f" ({why})" if why else ""))
        if r.num_desirable or r.num_undesirable:  # labelled (KTO) data
            p(f"  labels         {r.num_desirable} desirable, {r.num_undesirable} undesirable")
        if any(count != "1" for count in r.rated_turns):  # some record rates more than its last turn
            per = ", ".join(f"{n} in {r.rated_turns[n]}" for n in sorted(r.rated_turns, key=int))
            p(f"  rated turns    {sum(int(n) * k for n, k in r.rated_turns.items())} "
              f"(rated turns per conversation: {per} conversations)")
        if r.num_folded:
            p(f"  folded         {r.num_folded} records rate a turn of another record's conversation: trained as "
              "that conversation's rated turns, in one forward pass with it")
        lengths = sorted(r.token_lengths)
        p(f"  tokens/example p50 {_percentile(lengths, 50)}, p90 {_percentile(lengths, 90)}, "
          f"p99 {_percentile(lengths, 99)}, max {lengths[-1] if lengths else 0}")
        if config.truncation_mode == "keep_end":  # KTO's default
            p(f"  truncated      {r.num_truncated} longer than cutoff_len {config.cutoff_len}: {r.num_prompts_cut} "
              f"prompts cut from the start (oldest turns first), {r.num_completions_cut} completions cut at the end")
        else:
            p(f"  truncated      {r.num_truncated} longer than cutoff_len {config.cutoff_len} (cut at the end)")
        p(f"  trained tokens {r.num_trained_tokens:,}")
        if r.skipped:
            p(f"  skipped        records {', '.join(str(origin).rsplit('#', 1)[-1] for origin, _ in r.skipped)}")
            for origin, reason in r.skipped[:MAX_LISTED_SKIPS]:
                p(f"    {reason}")
            if len(r.skipped) > MAX_LISTED_SKIPS:
                p(f"    ... and {len(r.skipped) - MAX_LISTED_SKIPS} more")
    p("")
    p(f"total: {len(data.train)} train examples, {len(data.eval) if data.eval is not None else 0} eval examples, "
      f"{sum(r.num_trained_tokens for r in data.reports):,} trained tokens")
    labels = data.train["label"]
    n_d = sum(1 for label in labels if label is True)
    n_u = sum(1 for label in labels if label is False)
    if n_d or n_u:  # labelled (KTO) data
        p(f"KTO balance (train split): {balance_advice(config, n_d, n_u)}")


def print_preview(config: RunConfig, tokenizer, data, n: int, out=None) -> None:
    """Decoded examples; trained spans between ⟦ and ⟧ (and green on a terminal)."""
    out = out or sys.stdout
    colour = out.isatty()
    start, end = ("\033[32m⟦", "⟧\033[0m") if colour else ("⟦", "⟧")
    for i in range(min(n, len(data.train))):
        row = data.train[i]
        label = "" if row["label"] is None else f" | label {'desirable' if row['label'] else 'undesirable'}"
        trained = sum(1 for t in row["labels"] if t != IGNORE_INDEX)
        print(f"─── example {i} | {row['origin']} | {len(row['input_ids'])} tokens, {trained} trained{label}", file=out)
        text, run, run_trained = [], [], None
        for token, target in zip(row["input_ids"], row["labels"]):
            is_trained = target != IGNORE_INDEX
            if run and is_trained != run_trained:
                piece = tokenizer.decode(run)
                text.append(f"{start}{piece}{end}" if run_trained else piece)
                run = []
            run.append(token)
            run_trained = is_trained
        if run:
            piece = tokenizer.decode(run)
            text.append(f"{start}{piece}{end}" if run_trained else piece)
        print("".join(text), file=out)
    print(f"─── trained spans are marked {start}like this{end}", file=out)
