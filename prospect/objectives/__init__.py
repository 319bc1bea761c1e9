"""Training objectives. Each is one file with one class, used by the loop (`prospect.train`) and by
`prospect eval` through the same few members:

- `SUM_KEYS`: the sums its steps and evaluations return (added over ranks and steps), and
  `metrics(sums)`, the logged means; `PLOTS`, the plots of them that `plot_loss` draws;
- `describe(train_set)`: a line about the data worth printing before training, or None;
- `fingerprint(train_set)`: what a checkpoint must have been trained on to be continued;
- `uses_reference_model` / `prepare(splits, reference, …)`: what it needs before the first step (KTO:
  the reference model's log-probs);
- `step(examples, indices, micro_batches, …)`: one optimizer step's forward and backward passes;
- `evaluate(examples, …)`: held-out metrics, and `base_row`, whether the base model's are worth showing.

A new objective is a new file here and a line in `objective_for`.
"""

from __future__ import annotations


def objective_for(config):
    from prospect.objectives.kto import KTO
    from prospect.objectives.sft import SFT

    return {"sft": SFT, "kto": KTO}[config.stage](config)
