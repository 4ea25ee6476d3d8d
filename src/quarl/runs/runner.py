"""Execute a suite: plan every (cell, seed) against the registry, then run what is missing and resume what was killed.

The plan is computed from files only: each (cell, seed) has a resolved config (the trainer's own resolution, passed
in as ``resolve`` so this module stays below ``quarl.rl``), hence a config hash and a run id, hence a directory
``root/<run id>`` whose computed status decides the action:

    committed record SKIP     a packed record of it is in ``evidence`` (quarl.runs.record): finished elsewhere
    no directory     RUN      runner(base, overrides, out_dir=root/<id>, resume=None)
    killed           RESUME   runner(None, [], out_dir=None, resume=root/<id>)
    failed           SKIP     (RESUME with retry_failed: a crash is usually not transient, so it is opt-in)
    running          SKIP     another process owns it
    finished         SKIP     immutable

A committed record wins over a local run directory, so a fresh checkout resumes a suite where the records end
instead of running finished cells again. Two cells that resolve to the same config (and seed) are an error before anything runs: they would be one run.
``runner`` is ``quarl.rl.train`` in production; tests inject a fake. With ``jobs > 1`` runs go to a pool of spawned
processes (the runner must then be a picklable module-level function); a failing run never stops the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path

from quarl.runs import registry as R
from quarl.runs.record import is_record, read_header
from quarl.runs.suite import Cell, Suite

log = logging.getLogger(__name__)

Resolver = Callable[[dict | Path, Sequence[str]], dict]  # (base config, overrides) -> resolved config dict
Runner = Callable[[dict | str, list[str], Path | None, Path | None], Path]  # quarl.rl.train's signature


class Action(enum.Enum):
    RUN = "run"
    RESUME = "resume"
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    seed: int
    overrides: tuple[str, ...]  # the cell's overrides + run.seed + run.name
    config_hash: str
    run_id: str
    path: Path  # root / run_id, an older directory of the same experiment (_same_run_elsewhere), or its record
    status: R.RunStatus | None  # None: not started
    action: Action
    committed: bool = False  # path is a packed record (evidence), not a run directory

    @property
    def reason(self) -> str:
        if self.committed:
            return "finished, committed record"
        if self.status is None:
            return "missing"
        return self.status.value


@dataclasses.dataclass(frozen=True)
class Outcome:
    planned: PlannedRun
    path: Path | None  # where the runner says the run is
    error: str | None  # None: the runner returned


def plan(suite: Suite, resolve: Resolver, root: Path, retry_failed: bool = False,
         evidence: Path | None = None) -> list[PlannedRun]:
    """Resolve every (cell, seed) and decide what to do with it (see the module docstring).

    ``evidence`` is the directory of the suite's committed records (``evidence/<suite name>``); None: no records.

    Raises:
        ValueError: a cell's overrides are invalid (from ``resolve``), or two cells resolve to the same config.
    """
    root = Path(root)
    out, seen = [], {}
    for name, overrides, seed in suite.runs():
        cell = suite.cell(name)
        try:
            config = resolve(suite.base, list(overrides))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"suite {suite.name!r}, cell {name!r}: {e}") from e
        h = R.config_hash(config)
        if (h, seed) in seen:
            raise ValueError(f"suite {suite.name!r}: cells {seen[(h, seed)]!r} and {name!r} resolve to the same "
                             f"config (hash {h[:R.HASH_CHARS]}); make them differ or drop one")
        seen[(h, seed)] = name
        rid = R.run_id(config, seed, name)
        record = _committed_record(Path(evidence), rid, name, seed, h, resolve) if evidence is not None else None
        if record is not None:
            out.append(PlannedRun(cell, seed, tuple(overrides), h, rid, record, R.RunStatus.FINISHED, Action.SKIP,
                                  committed=True))
            continue
        path = root / rid
        if not (path / R.RUN_FILE).exists():
            path = _same_run_elsewhere(root, name, seed, h, resolve) or path
        status = R.run_status(path) if (path / R.RUN_FILE).exists() else None
        if status is None:
            action = Action.RUN
        elif status is R.RunStatus.KILLED or (status is R.RunStatus.FAILED and retry_failed):
            action = Action.RESUME
        else:
            action = Action.SKIP
        out.append(PlannedRun(cell, seed, tuple(overrides), h, rid, path, status, action))
    return out


def _same_run_elsewhere(root: Path, name: str, seed: int, h: str, resolve: Resolver) -> Path | None:
    """A run of this cell and seed whose recorded config, resolved again today, has hash ``h``.

    A new config field with a default changes every hash; re-resolving the run's own config.yaml through the current
    loader recognises it as the same experiment instead of running it again.
    """
    candidates = sorted(root.glob(f"{name}-*-s{seed}"))
    return _first_match(candidates, lambda c: R._read_json(c / R.RUN_FILE) or {}, name, seed, h, resolve)


def _committed_record(evidence: Path, rid: str, name: str, seed: int, h: str, resolve: Resolver) -> Path | None:
    """The record of this cell and seed in ``evidence`` (by run id first, else by re-resolving candidates' configs)."""
    if not evidence.is_dir():
        return None
    candidates = [evidence / rid] + sorted(p for p in evidence.glob(f"{name}-*-s{seed}") if p.name != rid)
    return _first_match([c for c in candidates if is_record(c)], read_header, name, seed, h, resolve)


def _first_match(candidates, meta_of: Callable[[Path], dict], name: str, seed: int, h: str,
                 resolve: Resolver) -> Path | None:
    for candidate in candidates:
        info = meta_of(candidate)
        if info.get("name") != name or info.get("seed") != seed or not (candidate / "config.yaml").exists():
            continue
        try:
            if R.config_hash(resolve(candidate / "config.yaml", [])) == h:
                return candidate
        except (ValueError, TypeError, KeyError) as e:  # an old config the loader no longer accepts
            log.info("%s: its config no longer resolves (%s); not the same run", candidate, e)
    return None


def _call(runner: Runner, base: dict | str, p: PlannedRun) -> Path:
    if p.action is Action.RUN:
        return Path(runner(base, list(p.overrides), p.path, None))
    # A resume continues with the run's own resolved config.yaml: no config, overrides or out_dir (the trainer
    # refuses the combination), and the trainer itself clears a failed run's exit record.
    return Path(runner(None, [], None, p.path))


def execute(suite: Suite, planned: Sequence[PlannedRun], runner: Runner, jobs: int = 1,
            on_event: Callable[[str, PlannedRun, str | None], None] | None = None) -> list[Outcome]:
    """Run the RUN / RESUME entries of a plan; ``on_event(kind, planned, detail)`` with kind start | done | failed.

    Returns:
        One :class:`Outcome` per executed entry, in plan order.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    notify = on_event or (lambda kind, p, detail: None)
    base = str(suite.base) if isinstance(suite.base, Path) else suite.base
    todo = [p for p in planned if p.action is not Action.SKIP]
    results: dict[int, Outcome] = {}

    def finish(i: int, p: PlannedRun, path: Path | None, error: str | None) -> None:
        results[i] = Outcome(p, path, error)
        if error is None and path is not None and path.resolve() != p.path.resolve():
            log.warning("%s: the runner wrote %s, not the planned %s", p.run_id, path, p.path)
        notify("failed" if error else "done", p, error or (str(path) if path else None))

    if jobs == 1:
        for i, p in enumerate(todo):
            notify("start", p, None)
            try:
                finish(i, p, _call(runner, base, p), None)
            except Exception as e:  # one failed run must not stop the suite; the error is reported per run
                log.debug("run %s failed", p.run_id, exc_info=True)
                finish(i, p, None, f"{type(e).__name__}: {e}")
    else:
        ctx = multiprocessing.get_context("spawn")  # fork after torch threads start is unsafe
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {}
            for i, p in enumerate(todo):
                notify("start", p, None)
                futures[pool.submit(_call, runner, base, p)] = (i, p)
            for fut in concurrent.futures.as_completed(futures):
                i, p = futures[fut]
                try:
                    finish(i, p, fut.result(), None)
                except Exception as e:
                    finish(i, p, None, f"{type(e).__name__}: {e}")
    return [results[i] for i in sorted(results)]
