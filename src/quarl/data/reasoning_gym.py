"""Offline GSM8K-format problems from reasoning-gym's ``gsm_symbolic`` generator, with disjoint held-out splits.

``gsm_symbolic`` (PyPI ``reasoning-gym``; templates derived from GSM8K test problems, after Mirzadeh et al.,
"GSM-Symbolic", 2024) samples a template and fresh numbers per item and ships a chain-of-thought that ends in
``#### N`` (``metadata["answer_cot"]``), so items drop straight into the GSM8K scorer.

Determinism: reasoning-gym builds item ``idx`` from ``random.Random(seed + idx)`` and picks its template from
``Random(seed).choices(..., k=size)``, whose prefix does not depend on ``size``; so item ``idx`` of a given
``(seed, difficulty)`` is the same however many items are requested.

Splits: an item belongs to ``test`` when the SHA-256 of its question text falls in the lowest ``test_fraction`` of
hash space, else to ``train``. The split is a function of the text alone, so the same question can never be in both
splits — not even when two different seeds or indices happen to generate identical text. (The templates are shared;
held-out here means held-out problem instances, as with GSM-Symbolic itself.)

reasoning-gym appends " Give the result as your final answer. Do not include units." to every question; it is
removed (kept in ``meta["rg_suffix"]``) because quarl appends verl's own ``####`` instruction at prompt time.
The ground truth is reasoning-gym's ``answer`` string; a few CoTs end in a float spelling of it (``#### 176.0`` for
``176``), which is rewritten to the answer string so the reference solution scores correct under verl's scorer.
"""

from __future__ import annotations

import decimal
import hashlib
import logging
from collections.abc import Iterator

from quarl.data.gsm8k import extract_ground_truth
from quarl.data.records import Problem

logger = logging.getLogger(__name__)

DATA_SOURCE = "reasoning_gym/gsm_symbolic"
_RG_SUFFIX = " Give the result as your final answer. Do not include units."
_SPLITS = ("train", "test")


def split_of(question: str, test_fraction: float = 0.1) -> str:
    """``"test"`` when the question's SHA-256 lands in the lowest ``test_fraction`` of hash space, else ``"train"``.

    >>> split_of("What is 2 + 2?", test_fraction=0.0), split_of("What is 2 + 2?", test_fraction=1.0)
    ('train', 'test')
    """
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return "test" if h < test_fraction * 2**64 else "train"


def _items(seed: int, difficulty: float, chunk: int = 1024) -> Iterator[tuple[int, dict]]:
    """Yield (index, item) forever, growing the underlying dataset size in chunks (items are size-independent)."""
    import reasoning_gym  # optional dependency (quarl[data])

    size = chunk
    idx = 0
    while True:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed, difficulty=difficulty)
        while idx < size:
            yield idx, ds[idx]
            idx += 1
        size *= 2


def _to_problem(idx: int, item: dict, seed: int, split: str) -> Problem:
    """One reasoning-gym item -> Problem, with the CoT's final '#### N' written as the item's own answer string."""
    question = item["question"].removesuffix(_RG_SUFFIX)
    gt = str(item["answer"])
    cot = item["metadata"]["answer_cot"]
    cot_answer = extract_ground_truth(cot)
    if cot_answer != gt:
        if decimal.Decimal(cot_answer) != decimal.Decimal(gt):
            raise ValueError(f"gsm_symbolic item {idx} (seed {seed}): CoT says {cot_answer!r}, answer is {gt!r}")
        cot = cot[: cot.rindex("####")] + "#### " + gt  # e.g. "#### 176.0" -> "#### 176", the answer scored against
    meta = {"split": split, "index": idx, "seed": seed, "rg_suffix": _RG_SUFFIX}
    return Problem(question, cot, gt, DATA_SOURCE, f"gsm_symbolic-{seed}-{idx}", meta)


def load_gsm_symbolic(n: int, split: str = "test", seed: int = 0, difficulty: float = 1.0,
                      test_fraction: float = 0.1) -> list[Problem]:
    """The first ``n`` ``gsm_symbolic`` problems of ``split`` for ``seed`` (deterministic, splits disjoint).

    Args:
        n: number of problems.
        split: ``"train"`` or ``"test"``.
        seed: reasoning-gym seed.
        difficulty: reasoning-gym difficulty (1.0 = the original number ranges).
        test_fraction: fraction of hash space assigned to ``test``; must match between train and test loads.

    Returns:
        ``n`` Problems with ``data_source = "reasoning_gym/gsm_symbolic"``, unique question texts.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for idx, item in _items(seed, difficulty):
        if len(problems) == n:
            break
        question = item["question"].removesuffix(_RG_SUFFIX)
        if question in seen or split_of(question, test_fraction) != split:
            continue
        seen.add(question)
        problems.append(_to_problem(idx, item, seed, split))
    logger.info("gsm_symbolic: %d %s problems (seed %d, difficulty %.2f)", len(problems), split, seed, difficulty)
    return problems
