"""Run under torchrun by tests/test_sharding.py: trains each config file given, one after the other, in
one process group (a process start per run would cost more than the tiny runs). `FILE@N` crashes the
run in its N-th optimizer step, as a lost machine would."""

from __future__ import annotations

import sys

from prospect.config import load_config
from prospect.objectives import objective_for
from prospect.train import train


def main() -> None:
    for argument in sys.argv[1:]:
        path, _, crash_step = argument.partition("@")
        config = load_config(path)
        if not crash_step:
            train(config)
            continue
        objective = type(objective_for(config))
        original, calls = objective.step, []

        def crashing(*args, **kwargs):
            calls.append(1)
            if len(calls) == int(crash_step):
                raise RuntimeError("simulated crash")
            return original(*args, **kwargs)

        objective.step = crashing
        try:
            train(config)
        except RuntimeError as error:
            assert "simulated crash" in str(error), error
        else:
            raise AssertionError(f"{path}: the run was to crash in step {crash_step}")
        finally:
            objective.step = original


if __name__ == "__main__":
    main()
