"""Named evaluation/training data sources, so the CLI and configs can say ``--data synthetic`` or a file path.

    synthetic      quarl's own multi-step arithmetic word problems (``quarl.data.synthetic``; the testbed's task)
    gsm_symbolic   reasoning-gym's GSM8K-derived templates (``quarl.data.reasoning_gym``)
    gsm8k          Hugging Face ``openai/gsm8k`` (``main`` config; needs the dataset cached or a network)
    <path>         a ``.jsonl`` file (question/answer) or a verl ``.parquet`` file, or a local ``datasets`` folder

The offline sources are seeded and split by a hash of the question text, so their ``test`` split never overlaps
their ``train`` split.
"""

from __future__ import annotations

from quarl.data.gsm8k import GSM8K_DATA_SOURCE, load_hf_gsm8k, load_problems
from quarl.data.reasoning_gym import load_gsm_symbolic
from quarl.data.records import Problem
from quarl.data.synthetic import Split, SyntheticConfig, generate

NAMED_SOURCES = ("synthetic", "gsm_symbolic", "gsm8k")
# quarl.models.testbed evaluates on seed 1234 of the synthetic test split; matching it makes CLI numbers comparable.
SYNTHETIC_EVAL_SEED = 1234


def load_source(source: str, n: int | None = None, split: str = "test", seed: int | None = None) -> list[Problem]:
    """Load problems from a named source or a path.

    Args:
        source: one of :data:`NAMED_SOURCES`, or a file/directory path.
        n: number of problems (None: all for files and gsm8k; required for the generators).
        split: ``"train"`` or ``"test"``.
        seed: generator seed (synthetic: default 1234, the testbed's; gsm_symbolic: default 0); ignored for files.

    Returns:
        The problems.
    """
    if source in ("synthetic", "gsm_symbolic") and n is None:
        raise ValueError(f"--data {source} is a generator; give the number of problems (n)")
    if source == "synthetic":
        seed = SYNTHETIC_EVAL_SEED if seed is None else seed
        return generate(SyntheticConfig(), n, Split(split), seed=seed)
    if source == "gsm_symbolic":
        return load_gsm_symbolic(n, split=split, seed=0 if seed is None else seed)
    if source == "gsm8k":
        problems = load_hf_gsm8k(GSM8K_DATA_SOURCE, split=split)
        return problems if n is None else problems[:n]
    return load_problems(source, split=split, n=n)
