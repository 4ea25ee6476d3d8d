"""Named evaluation/training data sources, so the CLI and configs can say ``--data synthetic`` or a file path.

    synthetic      quarl's own multi-step arithmetic word problems (``quarl.data.synthetic``; the testbed's task)
    gsm_symbolic   reasoning-gym's GSM8K-derived templates (``quarl.data.reasoning_gym``)
    gsm8k          Hugging Face ``openai/gsm8k`` (``main`` config; needs the dataset cached or a network)
    <path>         a ``.jsonl`` file (question/answer) or a verl ``.parquet`` file, or a local ``datasets`` folder
    <owner/name>   a Hugging Face dataset id in GSM8K layout (question/answer columns), cached or online

The offline sources are seeded and split by a hash of the question text, so their ``test`` split never overlaps
their ``train`` split.

A name that is none of these is a ``ValueError`` listing what is accepted, never a hub traceback: with
``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, a dataset id that is not in the ``datasets`` cache is rejected
before ``datasets`` is called (so no network is attempted); online, ``datasets`` tries the hub and its failure
(no such dataset, no network) becomes the same message.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from quarl.data.gsm8k import GSM8K_DATA_SOURCE, fetch_hf_rows, load_problems, problems_from_rows
from quarl.data.reasoning_gym import load_gsm_symbolic
from quarl.data.records import Problem
from quarl.data.synthetic import Split, SyntheticConfig, generate

NAMED_SOURCES = ("synthetic", "gsm_symbolic", "gsm8k")
# quarl.models.testbed evaluates on seed 1234 of the synthetic test split; matching it makes CLI numbers comparable.
SYNTHETIC_EVAL_SEED = 1234
FILE_SUFFIXES = (".jsonl", ".parquet")
ACCEPTED_FORMS = (f"a named source ({' | '.join(NAMED_SOURCES)}), a path to a .jsonl file (question/answer rows) "
                  "or a verl .parquet file, a local `datasets` directory, or a Hugging Face dataset id "
                  "('name' or 'owner/name') that is cached locally or reachable online")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # hub repo-id syntax
_TRUE = ("1", "true", "yes", "on")


def load_source(source: str, n: int | None = None, split: str = "test", seed: int | None = None) -> list[Problem]:
    """Load problems from a named source or a path.

    Args:
        source: one of :data:`NAMED_SOURCES`, a file/directory path, or a Hugging Face dataset id.
        n: number of problems (None: all for files and datasets; required for the generators).
        split: ``"train"`` or ``"test"``.
        seed: generator seed (synthetic: default 1234, the testbed's; gsm_symbolic: default 0); ignored for files.

    Returns:
        The problems.

    Raises:
        ValueError: ``source`` is not a named source, an existing file or directory, nor a dataset that can be
            loaded (cached, or online when not in offline mode); the message lists the accepted forms.
    """
    if source in ("synthetic", "gsm_symbolic") and n is None:
        raise ValueError(f"--data {source} is a generator; give the number of problems (n)")
    if source == "synthetic":
        seed = SYNTHETIC_EVAL_SEED if seed is None else seed
        return generate(SyntheticConfig(), n, Split(split), seed=seed)
    if source == "gsm_symbolic":
        return load_gsm_symbolic(n, split=split, seed=0 if seed is None else seed)
    if source == "gsm8k":
        problems = _load_hub(GSM8K_DATA_SOURCE, split, label="gsm8k")
        return problems if n is None else problems[:n]
    path = Path(source)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in FILE_SUFFIXES):
        return load_problems(source, split=split, n=n)
    if path.exists():
        raise _unavailable(source, f"a file, but not {' or '.join(FILE_SUFFIXES)}")
    if path.suffix.lower() in FILE_SUFFIXES:
        raise _unavailable(source, "no such file")
    if not _HUB_ID_RE.match(source):
        raise _unavailable(source, "not a named source, not an existing path, not a Hugging Face dataset id")
    problems = _load_hub(source, split)
    return problems if n is None else problems[:n]


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value (read at call time)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _unavailable(source: str, reason: str) -> ValueError:
    """The one error for a data source that cannot be loaded: why, then every accepted form."""
    return ValueError(f"cannot load data source {source!r} ({reason}); use {ACCEPTED_FORMS}")


def _cached(dataset_id: str) -> bool:
    """Whether ``datasets`` holds a prepared copy of ``dataset_id``, i.e. what it can load offline.

    Mirrors where ``datasets``' offline fallback (``CachedDatasetModuleFactory``) looks:
    ``$HF_DATASETS_CACHE/<owner>___<snake_name>/<config>/<version>/<hash>/``.
    """
    import datasets  # optional dependency (quarl[data])
    from datasets.naming import camelcase_to_snakecase

    parts = dataset_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = os.path.join(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)), "___".join(parts))
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(root, "*", "*", "*")))


def _load_hub(dataset_id: str, split: str, label: str | None = None) -> list[Problem]:
    """Load a hub dataset id; offline and uncached raises before any network use, a ``datasets`` failure converts."""
    label = label or dataset_id
    if hub_offline() and not _cached(dataset_id):
        raise _unavailable(label, f"dataset {dataset_id!r} is not in the local datasets cache, and offline "
                           "mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) is set")
    try:
        rows = fetch_hf_rows(dataset_id, split=split)
    except Exception as err:  # datasets raises ConnectionError, DatasetNotFoundError, FileNotFoundError, ...
        raise _unavailable(label, f"could not load dataset {dataset_id!r}: {type(err).__name__}: {err}") from err
    return problems_from_rows(rows, split, GSM8K_DATA_SOURCE)
