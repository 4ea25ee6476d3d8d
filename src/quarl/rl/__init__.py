"""quarl.rl: GRPO + LoRA over the quantized model, on TRL (`quarl.rl.engine` is the only TRL-specific module).

    from quarl.rl import train, load_config
    run_dir = train("configs/testbed_w4a4.yaml", ["grpo.steps=20"])
    train(resume=run_dir)

`train` is imported lazily so that ``import quarl.rl`` (configs, health metrics) works without TRL installed.
"""

from typing import Any

from quarl.rl.config import TrainConfig, apply_overrides, load_config

__all__ = ["TrainConfig", "apply_overrides", "load_config", "train"]


def train(*args: Any, **kwargs: Any) -> Any:
    """See `quarl.rl.run.train`."""
    from quarl.rl.run import train as _train

    return _train(*args, **kwargs)
