"""The experiment registry: one directory per run, an id derived from the config, a status computed from files.

Why: in hand-run studies, experiment IDs collide and are reused, logs are overwritten or lost, and a status
column is typed by hand. Here

- a run's id is ``[name-]<config hash[:10]>-s<seed>``, where the hash is sha256 of the canonical JSON of the resolved
  config without ``run.seed`` and ``run.name`` (so seeds of one cell share a hash, and a renamed rerun of an identical
  config is recognisably the same experiment);
- :func:`create_run` makes the directory with one exclusive ``mkdir`` (atomic: two launches of the same config + seed
  cannot both win) and refuses an existing one with its computed status and what to do instead;
- the status is never written by hand. It is derived from three files, each replaced atomically (tmp + rename):
  ``exit.json`` (written by :func:`mark_exit` on a clean finish or a caught failure) wins; otherwise the latest
  ``heartbeat.json`` (or, before the first heartbeat, ``run.json``) names a pid and host: a live pid on this host means
  RUNNING, a dead one KILLED; on another host, a heartbeat younger than ``stale_after_s`` means RUNNING, older KILLED.
  A pid recycled by an unrelated process is told apart by its start time (``/proc/<pid>/stat``) where Linux has it.
- finished runs are immutable: :func:`clear_exit` (the first thing a resume does) and :func:`heartbeat` refuse them.

A run directory, as the trainer writes it: ``run.json``, ``heartbeat.json``, ``exit.json``, ``config.yaml``,
``env.json``, ``metrics.jsonl`` (one JSON object per step; :func:`read_metrics`), ``eval/step-<N>.jsonl`` (per-problem
validation correctness), ``tb/``, ``checkpoints/checkpoint-N/``, ``train.log``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE, HEARTBEAT_FILE, EXIT_FILE, METRICS_FILE = "run.json", "heartbeat.json", "exit.json", "metrics.jsonl"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
HASH_CHARS = 10  # hash prefix in a run id: 40 bits, collisions among a lab's runs are negligible


class RunStatus(enum.Enum):
    """A run's state, computed by :func:`run_status` from its files."""

    RUNNING = "running"  # a live process (or a fresh heartbeat from another host) owns the directory
    FINISHED = "finished"  # exit.json says so; the directory is immutable
    FAILED = "failed"  # the trainer caught an exception and wrote exit.json with the error
    KILLED = "killed"  # no exit.json and the owning process is gone (SIGKILL, OOM, reboot) or its heartbeat is stale


class RunExistsError(FileExistsError):
    """A run directory already exists; ``status`` is its computed status and ``path`` the directory."""

    def __init__(self, path: Path, status: RunStatus, message: str):
        super().__init__(message)
        self.path, self.status = path, status


class RunFinishedError(RuntimeError):
    """An attempt to modify (resume, heartbeat) a finished run: finished run directories are immutable."""


# --- ids -----------------------------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (tuple, set, frozenset)):
        return sorted(obj) if isinstance(obj, (set, frozenset)) else list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"config value of type {type(obj).__name__} is not JSON-serializable: {obj!r}")


def canonical_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace, enums by value, tuples as lists) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=True)


def config_hash(config: dict) -> str:
    """sha256 hex of the canonical JSON of a resolved config dict, excluding ``run.seed`` and ``run.name``.

    >>> a = {"grpo": {"lr": 1e-5}, "run": {"seed": 1, "name": "a", "checkpoint_every": 10}}
    >>> b = {"grpo": {"lr": 1e-5}, "run": {"seed": 2, "name": "b", "checkpoint_every": 10}}
    >>> config_hash(a) == config_hash(b), config_hash(a) == config_hash({**b, "grpo": {"lr": 2e-5}})
    (True, False)
    """
    if not isinstance(config, dict):
        raise TypeError(f"config_hash needs a resolved config dict, got {type(config).__name__}")
    cfg = dict(config)
    if isinstance(cfg.get("run"), dict):
        cfg["run"] = {k: v for k, v in cfg["run"].items() if k not in ("seed", "name")}
    return hashlib.sha256(canonical_json(cfg).encode()).hexdigest()


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid run name (``[A-Za-z0-9_.-]+``), else raise ValueError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} must match [A-Za-z0-9_.-]+ (it becomes part of a directory name)")
    return name


def run_id(config: dict, seed: int, name: str | None = None) -> str:
    """``f"{name}-{hash[:10]}-s{seed}"`` (or without the name): the run's directory name under ``runs/``.

    >>> run_id({"a": 1}, 3, "E13g")
    'E13g-015abd7f5c-s3'
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    short = f"{config_hash(config)[:HASH_CHARS]}-s{seed}"
    return f"{check_name(name)}-{short}" if name is not None else short


# --- atomic files --------------------------------------------------------------------------------------------------

def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON via a same-directory temp file, fsync and rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # only possible if written by something else
        log.warning("%s is not valid JSON (%s); ignoring it", path, e)
        return None


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses; fields after the last ')' are space-separated, and
    # starttime is field 22 overall, i.e. index 19 after the ')'.
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _owner() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "pid_start": _proc_start_ticks(pid)}


# --- lifecycle -----------------------------------------------------------------------------------------------------

def create_run(run_dir: Path, meta: dict) -> Path:
    """Create a run directory exclusively and write its ``run.json``.

    Args:
        run_dir: the directory (parents are created); usually ``runs/<run_id(...)>``.
        meta: merged into run.json after the defaults; normally ``{"name", "seed", "config_hash"}`` plus anything
            the trainer wants recorded. ``id`` defaults to the directory name.

    Returns:
        ``run_dir``.

    Raises:
        RunExistsError: the directory exists (the message gives its status and, for a killed / failed run or one
            running on another host, the ``quarl train --resume DIR`` command).
    """
    run_dir = Path(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    twin = _same_config_and_seed(run_dir.parent, meta)
    if twin is not None and twin != run_dir:
        status = run_status(twin)
        raise RunExistsError(twin, status, f"{twin} already holds this config (hash {meta['config_hash'][:HASH_CHARS]})"
                                           f" and seed {meta['seed']} under another name (status: {status.value}); "
                                           f"an identical config + seed is one run: use {twin} or change the config")
    try:
        os.mkdir(run_dir)  # the exclusive step: exactly one creator wins
    except FileExistsError:
        raise _exists_error(run_dir) from None
    owner = _owner()
    info = {"id": run_dir.name, "name": None, "seed": None, "config_hash": None, "created_utc": _utc_now(),
            "created_unix": time.time(), "host": owner["host"], "pid": owner["pid"], "pid_start": owner["pid_start"],
            "argv": list(sys.argv), **meta}
    _write_json_atomic(run_dir / RUN_FILE, info)
    return run_dir


def _same_config_and_seed(parent: Path, meta: dict) -> Path | None:
    """A sibling run directory recording the same config hash and seed (an identical run under another name)."""
    if meta.get("config_hash") is None or meta.get("seed") is None:
        return None
    for info_path in sorted(parent.glob(f"*/{RUN_FILE}")):
        info = _read_json(info_path)
        if info and info.get("config_hash") == meta["config_hash"] and info.get("seed") == meta["seed"]:
            return info_path.parent
    return None


def _exists_error(run_dir: Path) -> RunExistsError:
    if not (run_dir / RUN_FILE).exists():
        return RunExistsError(run_dir, RunStatus.KILLED,
                              f"{run_dir} already exists but is not a quarl run (no {RUN_FILE}); "
                              f"choose another directory or remove it yourself")
    status = run_status(run_dir)
    hb = _last_beat(run_dir) or {}
    where = f"pid {hb.get('pid')} on {hb.get('host')}"
    here = hb.get("host") == socket.gethostname()
    if status is RunStatus.FINISHED:
        hint = "finished runs are immutable: change the config, the seed or the name (run.name) to run it again"
    elif status is RunStatus.RUNNING and here:
        hint = f"it is running now ({where}); wait for it or stop that process, then: quarl train --resume {run_dir}"
    elif status is RunStatus.RUNNING:
        hint = (f"it is running elsewhere ({where}, last heartbeat {hb.get('time_utc')}); if that machine is gone: "
                f"quarl train --resume {run_dir}")
    else:
        hint = f"resume it with: quarl train --resume {run_dir}"
    return RunExistsError(run_dir, status, f"run directory {run_dir} already exists (status: {status.value}); {hint}")


def heartbeat(run_dir: Path, step: int, total_steps: int | None = None) -> None:
    """Record that this process is alive at ``step`` (atomic ``heartbeat.json``); call at least once per step."""
    run_dir = Path(run_dir)
    ex = _read_json(run_dir / EXIT_FILE)
    if ex is not None and ex.get("status") == RunStatus.FINISHED.value:
        raise RunFinishedError(f"{run_dir} is finished (exit.json); finished runs are immutable")
    now = time.time()
    _write_json_atomic(run_dir / HEARTBEAT_FILE, {**_owner(), "step": int(step), "total_steps": total_steps,
                                                  "time_utc": _utc_now(), "unix": now})


def mark_exit(run_dir: Path, status: RunStatus | str, step: int, error: str | None = None) -> None:
    """Write ``exit.json``: the run ended FINISHED (error must be None), FAILED or KILLED (a caught signal)."""
    status = RunStatus(status)
    if status is RunStatus.RUNNING:
        raise ValueError("mark_exit records an end: finished, failed or killed, not running")
    if status is RunStatus.FINISHED and error is not None:
        raise ValueError("a finished run has no error; use status='failed'")
    _write_json_atomic(Path(run_dir) / EXIT_FILE, {**_owner(), "status": status.value, "step": int(step),
                                                   "error": error, "time_utc": _utc_now(), "unix": time.time()})


def clear_exit(run_dir: Path) -> None:
    """Remove ``exit.json`` before resuming a failed / killed run; refuses a finished one (it is immutable)."""
    path = Path(run_dir) / EXIT_FILE
    ex = _read_json(path)
    if ex is not None and ex.get("status") == RunStatus.FINISHED.value:
        raise RunFinishedError(f"{run_dir} is finished; finished runs are immutable and cannot be resumed")
    path.unlink(missing_ok=True)


def _last_beat(run_dir: Path) -> dict | None:
    """heartbeat.json, or before the first heartbeat the owner fields of run.json."""
    hb = _read_json(run_dir / HEARTBEAT_FILE)
    if hb is not None:
        return hb
    info = _read_json(run_dir / RUN_FILE)
    if info is None:
        return None
    return {"pid": info.get("pid"), "host": info.get("host"), "pid_start": info.get("pid_start"), "step": 0,
            "total_steps": None, "time_utc": info.get("created_utc"), "unix": info.get("created_unix")}


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start_ticks is not None:
        now_ticks = _proc_start_ticks(pid)
        if now_ticks is not None and now_ticks != start_ticks:
            return False  # the pid was recycled by an unrelated process
    return True


def run_status(run_dir: Path, stale_after_s: float = 600) -> RunStatus:
    """Compute a run's status from its files (exit.json, else the heartbeat's pid / age); see the module docstring."""
    run_dir = Path(run_dir)
    ex = _read_json(run_dir / EXIT_FILE)
    if ex is not None:
        return RunStatus(ex["status"])
    hb = _last_beat(run_dir)
    if hb is None or not isinstance(hb.get("pid"), int):
        return RunStatus.KILLED
    if hb.get("host") == socket.gethostname():
        return RunStatus.RUNNING if _pid_alive(hb["pid"], hb.get("pid_start")) else RunStatus.KILLED
    age = time.time() - float(hb.get("unix") or 0.0)
    return RunStatus.RUNNING if age <= stale_after_s else RunStatus.KILLED


# --- reading -------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunInfo:
    """One row of ``quarl runs``: a run directory summarized from its files."""

    path: Path
    id: str
    name: str | None
    seed: int | None
    status: RunStatus
    step: int  # the last step reached (heartbeat, exit record or metrics, whichever is furthest)
    total_steps: int | None
    val_acc_first: float | None  # val/acc_strict at the first validation (normally step 0)
    val_acc_last: float | None  # val/acc_strict at the last validation
    wall_s: float | None  # created -> exit (or last heartbeat), downtime between a kill and a resume included


def _parse_line(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        # A line cut by SIGKILL and then continued by a resumed writer: keep the last complete object on it.
        start = line.rfind('{"step"')
        if start <= 0:
            return None
        try:
            row = json.loads(line[start:])
        except json.JSONDecodeError:
            return None
    return row if isinstance(row, dict) else None


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``metrics.jsonl``, one per step in step order; a resumed run's re-logged step replaces the earlier row.

    A truncated last line (SIGKILL mid-write) is skipped with a warning, as is any other unparseable line or a row
    without an int ``step``.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    by_step: dict[int, dict] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = _parse_line(line)
        if row is None or not isinstance(row.get("step"), int):
            log.warning("%s:%d: skipping an unreadable metrics line (%.60s)", path, lineno, line)
            continue
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def append_metrics(run_dir: Path, row: dict) -> None:
    """Append one row to ``metrics.jsonl``, first ending a line a killed writer left unterminated."""
    if not isinstance(row.get("step"), int):
        raise ValueError("a metrics row needs an int 'step'")
    path = Path(run_dir) / METRICS_FILE
    prefix = ""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            prefix = "" if f.read(1) == b"\n" else "\n"
    with open(path, "a") as f:
        f.write(prefix + json.dumps(row, default=_json_default, allow_nan=True) + "\n")


def _val_series(rows: list[dict], key: str = "val/acc_strict") -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]


def read_run(run_dir: Path) -> RunInfo:
    """Summarize a run directory; raises FileNotFoundError if it has no run.json."""
    run_dir = Path(run_dir)
    info = _read_json(run_dir / RUN_FILE)
    if info is None:
        raise FileNotFoundError(f"{run_dir} is not a quarl run (no readable {RUN_FILE})")
    status = run_status(run_dir)
    hb = _read_json(run_dir / HEARTBEAT_FILE) or {}
    ex = _read_json(run_dir / EXIT_FILE) or {}
    rows = read_metrics(run_dir)
    steps = [int(v) for v in (hb.get("step"), ex.get("step"), rows[-1]["step"] if rows else None) if v is not None]
    val = _val_series(rows)
    end = ex.get("unix") or hb.get("unix")
    start = info.get("created_unix")
    return RunInfo(path=run_dir, id=str(info.get("id", run_dir.name)), name=info.get("name"), seed=info.get("seed"),
                   status=status, step=max(steps, default=0), total_steps=hb.get("total_steps"),
                   val_acc_first=val[0][1] if val else None, val_acc_last=val[-1][1] if val else None,
                   wall_s=float(end) - float(start) if end is not None and start is not None else None)


def list_runs(root: Path = Path("runs")) -> list[RunInfo]:
    """Every run directory (one holding run.json) under ``root``, at any depth, sorted by creation time then id."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if RUN_FILE in filenames:
            dirnames.clear()  # a run's own subdirectories (checkpoints, tb) hold no runs
            try:
                found.append(read_run(Path(dirpath)))
            except FileNotFoundError:
                log.warning("%s: unreadable %s; skipping", dirpath, RUN_FILE)
        else:
            dirnames.sort()
    created = {r.path: (_read_json(r.path / RUN_FILE) or {}).get("created_unix") or 0.0 for r in found}
    return sorted(found, key=lambda r: (created[r.path], r.id))
