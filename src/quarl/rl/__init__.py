"""quarl.rl: GRPO + LoRA over the quantized model, on TRL (the TRL seam: `quarl.rl.engine`, `quarl.rl.vllm`).

    from quarl.rl import train, load_config
    run_dir = train("my.yaml", ["grpo.steps=20"])  # my.yaml: e.g. the output of `quarl train --example`
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
