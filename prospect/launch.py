"""Where `prospect train` runs: in this process, or on Ray when USE_RAY=1 or ray_num_workers > 1.

Under `torchrun`, every process runs `train(config)` directly (Accelerate reads the rank from the
environment). On Ray, Ray Train starts the workers and each of them runs the same `train(config)`.
"""

from __future__ import annotations

from prospect.config import RunConfig
from prospect.errors import UserError
from prospect.sharding import check_deepspeed_installed, deepspeed_json

def launch(config: RunConfig) -> dict:
    if not config.do_train:
        raise UserError(
            "do_train: false: `prospect train` only trains. For held-out metrics of a trained run use "
            "`prospect eval CONFIG`; to check the data, `prospect data check CONFIG`. Remove the key to train."
        )
    if config.deepspeed:  # the file and the package, before anything starts (on Ray, before the workers)
        deepspeed_json(config.deepspeed)
        check_deepspeed_installed()
    if config.uses_ray:
        from prospect.ray_launch import launch_on_ray

        return launch_on_ray(config)
    from prospect.train import train

    return train(config)
