"""Compact evidence records: a finished run reduced to its resolved config and one small ``record.jsonl``.

A run directory holds checkpoints, TensorBoard logs, pid files and one JSON row per validation problem: far more than
a results table needs, and nothing a repository should carry. :func:`pack_run` keeps what tables, curves and paired
intervals need, in a directory that can be committed (``quarl runs pack RUN_DIR... --into evidence/<suite>``)::

    <into>/<run id>/config.yaml     the run's resolved config, verbatim
    <into>/<run id>/record.jsonl    one JSON object per line, in this order:

    {"kind": "run", "format": 1, "id": "ste-s0", "name": "ste", "seed": 0, "config_hash": "8144...", "status":
     "finished", "step": 80, "total_steps": 80, "created_utc": "...", "wall_s": 1773.0, "env": {...}}   exactly once
    {"kind": "eval", "step": 0, "n": 1000, "problems": "<sha256>", "strict": "<base64>", "flexible": "<base64>",
     "metrics": {"val/acc_strict": 0.546, "val/n": 1000, ...}}                            one per validation, by step
    {"kind": "train", "key": "reward/mean", "steps": [[1, 80]], "values": [0.4219, ...]}   one per training metric

Per-problem correctness (``strict`` / ``flexible``): the validation's problem ids are put in sorted order (Python
``str`` order); bit ``i`` is set when the ``i``-th id was answered correctly; bits are packed little-endian within
each byte (``numpy.packbits(bitorder="little")``) and written as standard base64 with padding. ``problems`` is the
sha256 hex digest of the sorted ids joined by ``"\\n"``: two validations are paired problem by problem only when
their ``problems`` match, which is what :func:`quarl.runs.stats.paired_difference` needs. ``metrics`` is the run's
own ``metrics.jsonl`` row of that validation step (the ``val/*`` keys), unchanged, so accuracies are exactly those
the run logged. Training metrics keep :data:`TRAIN_KEYS` only, rounded to 4 significant digits (the curves' panels
and the usual diagnostics); every other per-step key is dropped. A training line's ``steps`` are inclusive ranges
``[first, last]`` of consecutive steps, in order; ``values`` has one entry per step they cover.

Only finished runs are packed. Reading is strict: an unknown key, a missing key, a bitset whose length or count does
not match ``n`` and the logged accuracy, or a format version this code does not know is an error.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from quarl import configio
from quarl.runs import registry as R

log = logging.getLogger(__name__)

RECORD_FILE = "record.jsonl"
FORMAT = 1
SCORERS = ("strict", "flexible")
TRAIN_KEYS = ("reward/mean", "reward/std", "loss", "grad_norm", "entropy", "completion_length", "mismatch/kl",
              "distill/kl", "aqn/sigma", "time/s_per_step")
_RUN_KEYS = ("kind", "format", "id", "name", "seed", "config_hash", "status", "step", "total_steps", "created_utc",
             "wall_s", "env")
_EVAL_KEYS = ("kind", "step", "n", "problems", *SCORERS, "metrics")
_TRAIN_LINE_KEYS = ("kind", "key", "steps", "values")
_KINDS = {"run": _RUN_KEYS, "eval": _EVAL_KEYS, "train": _TRAIN_LINE_KEYS}


# --- encoding ------------------------------------------------------------------------------------------------------

def encode_bits(bits: Sequence[bool] | np.ndarray) -> str:
    """Booleans -> base64 of the little-endian packed bits.

    >>> encode_bits([True, False, False, False, False, False, False, False, True])
    'AQE='
    """
    return base64.b64encode(np.packbits(np.asarray(bits, dtype=bool), bitorder="little").tobytes()).decode("ascii")


def decode_bits(text: str, n: int) -> np.ndarray:
    """base64 -> ``(n,)`` bool array; raises ValueError when the text does not hold exactly ``n`` bits.

    >>> decode_bits("AQE=", 9).nonzero()[0].tolist()
    [0, 8]
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"not a base64 bitset: {text[:40]!r} ({e})") from e
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"a bitset of {n} problems has {(n + 7) // 8} bytes, this one {len(raw)}")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little").astype(bool)
    if bits[n:].any():
        raise ValueError(f"bitset has bits set beyond its {n} problems")
    return bits[:n]


def problem_set_hash(ids: Sequence[str]) -> str:
    """sha256 hex of the sorted problem ids joined by newlines: the identity of a validation set."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def step_ranges(steps: Sequence[int]) -> list[list[int]]:
    """Increasing steps -> inclusive ``[first, last]`` ranges of consecutive steps.

    >>> step_ranges([1, 2, 3, 5, 7, 8])
    [[1, 3], [5, 5], [7, 8]]
    """
    out: list[list[int]] = []
    for s in steps:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    """The inverse of :func:`step_ranges`; raises ValueError for ranges that are malformed or not increasing."""
    steps: list[int] = []
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) for x in r) or r[0] > r[1]
                or (steps and r[0] <= steps[-1])):
            raise ValueError(f"steps: {r!r} is not an increasing [first, last] range")
        steps.extend(range(r[0], r[1] + 1))
    return steps


def _round4(x: float) -> float:
    return x if not math.isfinite(x) or x == 0 else float(f"{x:.4g}")


# --- reading -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One validation of a packed run: which of its ``n`` problems (sorted ids) each scorer judged correct."""

    step: int
    n: int
    problems: str  # problem_set_hash of the ids
    correct: dict[str, np.ndarray]  # scorer -> (n,) bool, problem i = the i-th sorted id
    metrics: dict  # the run's metrics.jsonl row of this step (val/* keys)

    def as_mapping(self, scorer: str) -> dict[str, bool]:
        """``{key: correct}`` keyed ``<problems[:16]>:<index>``: sorted like the ids, shared only with the same set."""
        return {f"{self.problems[:16]}:{i:07d}": bool(c) for i, c in enumerate(self.correct[scorer])}


@dataclasses.dataclass(frozen=True)
class Record:
    """A packed run: its header line, resolved config, validations and training series."""

    path: Path  # the record directory
    header: dict
    config: dict
    evals: tuple[EvalRecord, ...]  # by step
    train: dict[str, tuple[list[int], list[float]]]  # key -> (steps, values)

    def eval_at(self, step: int) -> EvalRecord | None:
        return next((e for e in self.evals if e.step == step), None)

    def rows(self) -> list[dict]:
        """Per-step rows like ``registry.read_metrics``: the validation metrics and the kept training metrics."""
        by_step: dict[int, dict] = {}
        for key, (steps, values) in self.train.items():
            for s, v in zip(steps, values):
                by_step.setdefault(s, {"step": s})[key] = v
        for e in self.evals:
            by_step.setdefault(e.step, {"step": e.step}).update(e.metrics)
        return [by_step[s] for s in sorted(by_step)]


def is_record(path: Path) -> bool:
    return (Path(path) / RECORD_FILE).is_file()


def read_header(path: Path) -> dict:
    """The run line of a record (name, seed, config hash, ...) without decoding the rest; {} when unreadable."""
    try:
        with open(Path(path) / RECORD_FILE) as f:
            obj = json.loads(f.readline())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable record header (%s)", path, e)
        return {}
    return obj if isinstance(obj, dict) and obj.get("kind") == "run" else {}


def _check_keys(obj: dict, valid: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in valid:
            raise configio.unknown_key_error(str(key), valid, where)
    missing = [k for k in valid if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def _parse_eval(obj: dict, where: str) -> EvalRecord:
    n = obj["n"]
    if not isinstance(n, int) or n < 1 or not isinstance(obj["step"], int):
        raise ValueError(f"{where}: step and n must be ints (n >= 1)")
    correct = {s: decode_bits(obj[s], n) for s in SCORERS}
    for s in SCORERS:  # the bits must agree with the accuracy the run logged
        acc = obj["metrics"].get(f"val/acc_{s}")
        if isinstance(acc, (int, float)) and round(acc * n) != int(correct[s].sum()):
            raise ValueError(f"{where}: {s} bitset has {int(correct[s].sum())}/{n} correct but the run logged "
                             f"val/acc_{s} = {acc}")
    return EvalRecord(obj["step"], n, str(obj["problems"]), correct, dict(obj["metrics"]))


def read_record(path: Path) -> Record:
    """Read and validate a record directory (``config.yaml`` + ``record.jsonl``).

    Raises:
        FileNotFoundError: no record.jsonl / config.yaml.
        ValueError: malformed JSON, an unknown or missing key, an unknown format version, bitsets that disagree with
            ``n`` or the logged accuracy, a repeated step or training key.
    """
    path = Path(path)
    file = path / RECORD_FILE
    if not file.is_file() or not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} is not a packed run record (needs {RECORD_FILE} and config.yaml)")
    header, evals, train = None, {}, {}
    for lineno, line in enumerate(file.read_text().splitlines(), 1):
        where = f"{file}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if not isinstance(obj, dict) or obj.get("kind") not in _KINDS:
            raise ValueError(f"{where}: each line is an object whose kind is one of {', '.join(_KINDS)}")
        _check_keys(obj, _KINDS[obj["kind"]], f"{where} ({obj['kind']} line)")
        if obj["kind"] == "run":
            if lineno != 1:
                raise ValueError(f"{where}: the run line must be the first and only one")
            if obj["format"] != FORMAT:
                raise ValueError(f"{where}: record format {obj['format']!r}; this quarl reads format {FORMAT}")
            header = obj
        elif header is None:
            raise ValueError(f"{file}: the first line must be the run line")
        elif obj["kind"] == "eval":
            if obj["step"] in evals:
                raise ValueError(f"{where}: a second validation at step {obj['step']}")
            evals[obj["step"]] = _parse_eval(obj, where)
        else:
            try:
                steps = expand_ranges(obj["steps"])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
            if obj["key"] in train or len(steps) != len(obj["values"]):
                raise ValueError(f"{where}: training key {obj['key']!r} repeated, or {len(steps)} steps for "
                                 f"{len(obj['values'])} values")
            train[obj["key"]] = (steps, [math.nan if v is None else float(v) for v in obj["values"]])
    if header is None:
        raise ValueError(f"{file}: empty record")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return Record(path, header, config, tuple(evals[s] for s in sorted(evals)), train)


# --- packing -------------------------------------------------------------------------------------------------------

def _eval_line(run_dir: Path, row: dict) -> dict:
    step = row["step"]
    path = run_dir / "eval" / f"step-{step}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: validation at step {step} has no {path.name}; cannot record which "
                                f"problems were correct")
    by_id: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: unreadable row in a finished run ({e})") from e
        if str(obj["id"]) in by_id:
            raise ValueError(f"{path}:{lineno}: problem id {obj['id']!r} appears twice")
        by_id[str(obj["id"])] = obj
    ids = sorted(by_id)
    metrics = {k: v for k, v in row.items() if k != "step"}
    if isinstance(row.get("val/n"), int) and row["val/n"] != len(ids):
        raise ValueError(f"{path}: {len(ids)} problems but the run logged val/n = {row['val/n']}")
    line = {"kind": "eval", "step": step, "n": len(ids), "problems": problem_set_hash(ids)}
    for s in SCORERS:
        line[s] = encode_bits([bool(by_id[i][f"correct_{s}"]) for i in ids])
    line["metrics"] = metrics
    _parse_eval(line, str(path))  # the same checks a reader makes (counts agree with the logged accuracy)
    return line


def record_lines(run_dir: Path) -> list[dict]:
    """The lines of a finished run's record (see the module docstring).

    Raises:
        ValueError: the run is not finished, or its validation files disagree with its metrics.
        FileNotFoundError: not a run, or a validation without its per-problem file.
    """
    run_dir = Path(run_dir)
    info = R.read_run(run_dir)
    if info.status is not R.RunStatus.FINISHED:
        raise ValueError(f"{run_dir}: status {info.status.value}; only finished runs are packed")
    meta = R._read_json(run_dir / R.RUN_FILE) or {}
    env = R._read_json(run_dir / "env.json") or {}
    rows = R.read_metrics(run_dir)
    header = {"kind": "run", "format": FORMAT, "id": info.id, "name": info.name, "seed": info.seed,
              "config_hash": meta.get("config_hash"), "status": info.status.value, "step": info.step,
              "total_steps": info.total_steps, "created_utc": meta.get("created_utc"),
              "wall_s": None if info.wall_s is None else round(info.wall_s, 1), "env": env}
    evals = [_eval_line(run_dir, r) for r in rows if r.get("val/acc_strict") is not None]
    if not evals:
        raise ValueError(f"{run_dir}: no validation in metrics.jsonl; nothing to record")
    train = []
    for key in TRAIN_KEYS:
        pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
               and not isinstance(r.get(key), bool)]
        if pts:
            train.append({"kind": "train", "key": key, "steps": step_ranges([s for s, _ in pts]),
                          "values": [None if math.isnan(v) else _round4(v) for _, v in pts]})
    return [header, *evals, *train]


def pack_run(run_dir: Path, into: Path, name: str | None = None) -> tuple[Path, bool]:
    """Write ``into/<name>/{config.yaml, record.jsonl}`` for a finished run; ``name`` defaults to the run's id.

    Returns:
        (the record directory, whether it was written: False when an identical record is already there).

    Raises:
        FileExistsError: a different record already has that directory (records are immutable).
        ValueError / FileNotFoundError: see :func:`record_lines`.
    """
    run_dir = Path(run_dir)
    lines = record_lines(run_dir)
    text = "".join(json.dumps(x, separators=(", ", ": "), allow_nan=False) + "\n" for x in lines)
    config = (run_dir / "config.yaml").read_text()
    dest = Path(into) / (name or R.check_name(lines[0]["id"]))
    if dest.exists():
        same = is_record(dest) and (dest / RECORD_FILE).read_text() == text and \
            (dest / "config.yaml").read_text() == config
        if same:
            return dest, False
        raise FileExistsError(f"{dest} already holds a different record; records are immutable: remove it yourself "
                              f"if {run_dir} is meant to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a record is an ordinary directory
    try:
        (tmp / "config.yaml").write_text(config)
        (tmp / RECORD_FILE).write_text(text)
        read_record(tmp)  # what was written reads back
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("packed %s into %s", run_dir, dest)
    return dest, True


def list_records(root: Path) -> list[Path]:
    """Record directories at any depth under ``root`` (or ``root`` itself), sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if RECORD_FILE in filenames:
            dirnames.clear()
            found.append(Path(dirpath))
    return sorted(found)
