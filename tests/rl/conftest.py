"""Tiny GRPO runs on the shipped testbed: a few steps of 4 prompts x 2 completions, short completions, n=8 eval."""

import pytest

TINY = ["grpo.steps=2", "grpo.prompts_per_step=4", "grpo.generations=2", "grpo.max_new_tokens=40",
        "data.train_n=64", "eval.n=8", "eval.batch_size=8", "eval.every=10", "run.checkpoint_every=1"]


@pytest.fixture
def tiny():
    """The base overrides of a tiny run (append more)."""
    return list(TINY)
