"""GSM8K loaders and writers: Hugging Face ``openai/gsm8k``, verl's preprocessed parquet, and JSONL.

All of them produce :class:`quarl.data.records.Problem`, and the verl writer turns Problems back into verl's
parquet layout, so data moves both ways between quarl and a verl setup.

verl's layout (``volcengine/verl: examples/data_preprocess/gsm8k.py``), one row per problem:

    data_source  "openai/gsm8k"
    prompt       [{"role": "user", "content": question + " " + VERL_GSM8K_INSTRUCTION}]
    ability      "math"
    reward_model {"style": "rule", "ground_truth": N}      # N = regex "#### (-?[0-9.,]+)" on the answer, "," removed
    extra_info   {"split": ..., "index": i, "answer": full solution, "question": raw question}

The ground truth is extracted as verl's preprocessing does (:func:`extract_ground_truth`: the FIRST ``#### N``,
commas removed — unlike the scorer, which takes the last one in the last 300 characters).

Nothing here downloads by itself: :func:`load_hf_gsm8k` calls ``datasets.load_dataset``, which works offline only
when the dataset is cached or when given a local directory/file; tests use local files only.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from quarl.data.records import Problem

logger = logging.getLogger(__name__)

# verl examples/data_preprocess/gsm8k.py: appended to the question, separated by one space.
VERL_GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
GSM8K_DATA_SOURCE = "openai/gsm8k"

SAMPLE_FILES = {"jsonl": "gsm8k_sample.jsonl", "parquet": "gsm8k_sample_verl.parquet"}  # in quarl/assets/data

_GT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_ground_truth(answer: str) -> str:
    """The final answer of a GSM8K reference solution, as verl's preprocessing extracts it.

    Args:
        answer: the full reference solution, containing ``#### N``.

    Returns:
        ``N`` with commas removed.

    Raises:
        ValueError: when the solution has no ``#### N`` (verl asserts).

    >>> extract_ground_truth("48/2 = 24 clips in May.\\n#### 1,072")
    '1072'
    """
    match = _GT_RE.search(answer)
    if match is None:
        raise ValueError(f"reference solution has no '#### <number>': {answer[-80:]!r}")
    return match.group(1).replace(",", "")


def sample_path(kind: str = "jsonl") -> Path:
    """Path of a shipped sample file: 8 hand-written GSM8K-format problems as JSONL, or the same as verl parquet."""
    if kind not in SAMPLE_FILES:
        raise ValueError(f"kind must be one of {sorted(SAMPLE_FILES)}, got {kind!r}")
    return Path(str(importlib.resources.files("quarl") / "assets" / "data" / SAMPLE_FILES[kind]))


def problem_from_qa(question: str, answer: str, data_source: str, id: str, meta: dict | None = None) -> Problem:
    """Build a :class:`Problem` from a question and a full ``#### N`` reference solution."""
    return Problem(question=question, answer=answer, ground_truth=extract_ground_truth(answer),
                   data_source=data_source, id=id, meta=dict(meta or {}))


def load_hf_gsm8k(path: str = GSM8K_DATA_SOURCE, split: str = "test", name: str = "main",
                  data_source: str = GSM8K_DATA_SOURCE) -> list[Problem]:
    """Load GSM8K through ``datasets.load_dataset`` (a hub id when cached/online, or a local dataset directory).

    Args:
        path: ``"openai/gsm8k"`` (cached or online) or a local directory of data files named by split
            (e.g. ``test-00000-of-00001.parquet``, the layout of the hub repository).
        split: ``"train"`` or ``"test"``.
        name: the dataset config (``"main"`` for openai/gsm8k; ignored for local data files).
        data_source: the name written into each Problem (verl uses ``"openai/gsm8k"``).

    Returns:
        Problems with ids ``"{split}-{index}"``.
    """
    return problems_from_rows(fetch_hf_rows(path, split, name), split, data_source)


def fetch_hf_rows(path: str = GSM8K_DATA_SOURCE, split: str = "test", name: str = "main") -> Iterable[dict]:
    """The rows of a dataset split via ``datasets.load_dataset`` (hub id or local directory); no conversion.

    Every failure here is ``datasets``' own (no such dataset, not cached, no network), which lets
    :mod:`quarl.data.sources` turn exactly those into a clear message without hiding data-format errors.
    """
    import datasets  # optional dependency (quarl[data])

    if Path(path).exists():
        return datasets.load_dataset(path, split=split)
    return datasets.load_dataset(path, name, split=split)


def problems_from_rows(rows: Iterable[dict], split: str, data_source: str = GSM8K_DATA_SOURCE) -> list[Problem]:
    """GSM8K-layout rows (``question``, full ``#### N`` ``answer``) -> Problems with ids ``"{split}-{index}"``."""
    return [problem_from_qa(row["question"], row["answer"], data_source, f"{split}-{i}", {"split": split, "index": i})
            for i, row in enumerate(rows)]


def read_jsonl(path: str | Path, data_source: str = GSM8K_DATA_SOURCE) -> list[Problem]:
    """Read JSONL rows with ``question`` and ``answer`` (full ``#### N`` solution), as openai/grade-school-math ships.

    Optional keys per row: ``ground_truth`` (else extracted from ``answer``), ``data_source``, ``id``, ``meta``.
    """
    problems = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("question", "answer"):
                if key not in row:
                    raise ValueError(f"{path}:{line_no + 1}: row has no {key!r} (keys: {sorted(row)})")
            gt = str(row["ground_truth"]) if "ground_truth" in row else extract_ground_truth(row["answer"])
            row_id = str(row.get("id", f"{Path(path).stem}-{len(problems)}"))
            problems.append(Problem(row["question"], row["answer"], gt, row.get("data_source", data_source), row_id,
                                    dict(row.get("meta", {}))))
    return problems


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> None:
    """Write Problems as JSONL (every field of :class:`Problem`); :func:`read_jsonl` reads it back unchanged."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")


def _question_from_prompt(prompt: Any, instruction: str) -> str:
    """Recover the raw question from a verl chat prompt by removing the trailing instruction."""
    content = prompt[-1]["content"] if isinstance(prompt, (list, tuple)) else str(prompt)
    suffix = " " + instruction
    return content[: -len(suffix)] if content.endswith(suffix) else content


def read_verl_parquet(path: str | Path, instruction: str = VERL_GSM8K_INSTRUCTION) -> list[Problem]:
    """Read a verl-format GSM8K parquet file (``examples/data_preprocess/gsm8k.py`` output).

    The question is ``extra_info.question`` when present, else the last prompt message with the verl instruction
    suffix removed; ``answer`` is ``extra_info.answer`` or ``""``; ground truth is ``reward_model.ground_truth``.
    """
    import pyarrow.parquet as pq  # optional dependency (quarl[data])

    problems = []
    for i, row in enumerate(pq.read_table(path).to_pylist()):
        extra = row.get("extra_info") or {}
        question = extra.get("question") or _question_from_prompt(row["prompt"], instruction)
        split, index = extra.get("split", Path(path).stem), extra.get("index", i)
        meta = {k: v for k, v in extra.items() if k not in ("question", "answer")}
        problems.append(Problem(question, extra.get("answer") or "", str(row["reward_model"]["ground_truth"]),
                                row.get("data_source") or GSM8K_DATA_SOURCE, f"{split}-{index}", meta))
    return problems


def to_verl_rows(problems: Iterable[Problem], split: str, instruction: str = VERL_GSM8K_INSTRUCTION) -> list[dict]:
    """Problems -> verl rows (the dicts ``examples/data_preprocess/gsm8k.py`` produces), index = position."""
    return [{
        "data_source": p.data_source,
        "prompt": [{"role": "user", "content": p.question + " " + instruction}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": p.ground_truth},
        "extra_info": {"split": split, "index": i, "answer": p.answer, "question": p.question},
    } for i, p in enumerate(problems)]


def write_verl_parquet(problems: Iterable[Problem], path: str | Path, split: str = "test",
                       instruction: str = VERL_GSM8K_INSTRUCTION) -> None:
    """Write Problems as a verl-format parquet file that verl's RLHFDataset and :func:`read_verl_parquet` read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(to_verl_rows(problems, split, instruction)), path)


def load_problems(source: str | Path, split: str = "test", n: int | None = None) -> list[Problem]:
    """Load Problems from a ``.jsonl``/``.parquet`` path (verl layout) or a ``datasets`` id/directory.

    Args:
        source: a ``.jsonl`` file, a verl ``.parquet`` file, or anything :func:`load_hf_gsm8k` accepts.
        split: the split for ``datasets`` sources.
        n: keep only the first ``n`` problems (None: all).

    Returns:
        The Problems, in file order.
    """
    suffix = Path(str(source)).suffix.lower()
    if suffix == ".jsonl":
        problems = read_jsonl(source)
    elif suffix == ".parquet":
        problems = read_verl_parquet(source)
    else:
        problems = load_hf_gsm8k(str(source), split=split)
    logger.info("loaded %d problems from %s", len(problems), source)
    return problems if n is None else problems[:n]
