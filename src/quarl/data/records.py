"""The one record type every quarl data source produces: a GSM8K-format math word problem.

Every loader (Hugging Face ``openai/gsm8k``, verl's preprocessed parquet, JSONL, reasoning-gym's ``gsm_symbolic``)
and quarl's own synthetic generator (``quarl.data.synthetic``) yields :class:`Problem`. Keeping a single, minimal,
frozen record means the evaluation harness and the RL reward see exactly the same fields, whatever the source.

GSM8K convention (openai/grade-school-math): the reference solution is chain-of-thought text whose last line is
``#### N``; ``N`` (commas removed, as verl's ``examples/data_preprocess/gsm8k.py::extract_solution`` does) is the
ground truth the scorer compares against.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Problem:
    """One GSM8K-format problem.

    Attributes:
        question: the problem text shown to the model (without any prompt suffix or chat template).
        answer: the full reference solution, ending in ``#### N`` (may be "" when a source only has the number,
            e.g. verl parquet without ``extra_info.answer``).
        ground_truth: the final answer ``N`` as a string, as verl stores it in ``reward_model.ground_truth``.
        data_source: the dataset name used in metric keys, e.g. ``"openai/gsm8k"`` (verl's ``data_source`` column).
        id: a stable identifier unique within its source, e.g. ``"test-17"``.
        meta: free-form extra fields (split, index, generator parameters, ...); JSON-serializable values only.
    """

    question: str
    answer: str
    ground_truth: str
    data_source: str
    id: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON-serializable when ``meta`` is)."""
        return dataclasses.asdict(self)
