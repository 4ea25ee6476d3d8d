"""Summaries of finished (or partial) runs: validation accuracy at step 0 and the final step, grouped over seeds.

A *group* is one experiment: the runs sharing a name and a config hash (the seeds of one suite cell). For each scorer
(strict, flexible) it holds the step-0 accuracy, the final accuracy and their difference Δ, in points (0-100), each
an :class:`~quarl.runs.stats.Estimate`: with ≥ 2 seeds a t interval over seeds; with one seed the within-run
interval (Wilson for an accuracy, paired bootstrap over the ``eval/step-N.jsonl`` problems for Δ). A packed record
(:mod:`quarl.runs.record`) reads into the same :class:`RunSummary` as its run directory, with the same numbers.

Config columns (format, injection point, phase, STE, AQN) are read from each run's resolved ``config.yaml``, never
from the suite that asked for it: the table reports what ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from quarl.runs import registry as R
from quarl.runs.record import Record, is_record, read_record
from quarl.runs.stats import MISSING, Estimate, accuracy_interval, paired_difference, seed_interval

log = logging.getLogger(__name__)

SCORERS = ("strict", "flexible")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run directory: its registry info, resolved config and validation accuracies (points)."""

    info: R.RunInfo
    config: dict
    rows: tuple[dict, ...]  # metrics.jsonl rows (read_metrics)
    first_step: int | None  # step of the first validation (normally 0)
    final_step: int | None  # step of the last validation
    config_hash: str | None = None  # as the run recorded it (run.json, or the record's run line)
    record: Record | None = None  # set when read from a packed record instead of a run directory

    @property
    def path(self) -> Path:
        return self.info.path

    def val(self, scorer: str, which: str) -> dict | None:
        """The metrics row of the first (``which="step0"``) or last (``"final"``) validation, if any."""
        step = self.first_step if which == "step0" else self.final_step
        return next((r for r in self.rows if r["step"] == step), None) if step is not None else None

    def acc(self, scorer: str, which: str) -> float | None:
        row = self.val(scorer, which)
        value = None if row is None else row.get(f"val/acc_{scorer}")
        return None if value is None else 100.0 * float(value)

    def eval_correct(self, step: int | None, scorer: str) -> dict[str, bool] | None:
        """Per-problem correctness from ``eval/step-<step>.jsonl`` or the record's bitset (None when absent)."""
        if step is None:
            return None
        if self.record is not None:
            found = self.record.eval_at(step)
            return None if found is None else found.as_mapping(scorer)
        return read_eval(self.path, step, scorer)


def read_eval(run_dir: Path, step: int, scorer: str = "strict") -> dict[str, bool] | None:
    """``{problem id: correct}`` from a run's ``eval/step-<step>.jsonl``; a truncated last line is skipped."""
    path = Path(run_dir) / "eval" / f"step-{step}.jsonl"
    if not path.exists():
        return None
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: skipping an unreadable line", path)
            continue
        out[str(row["id"])] = bool(row[f"correct_{scorer}"])
    return out


def summarize_run(run_dir: Path) -> RunSummary:
    """Read a run directory into a :class:`RunSummary`."""
    info = R.read_run(run_dir)
    cfg_path = Path(run_dir) / "config.yaml"
    config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
    rows = tuple(R.read_metrics(run_dir))
    val_steps = [r["step"] for r in rows if r.get("val/acc_strict") is not None]
    h = (R._read_json(Path(run_dir) / R.RUN_FILE) or {}).get("config_hash")
    return RunSummary(info, config, rows, val_steps[0] if val_steps else None, val_steps[-1] if val_steps else None,
                      config_hash=h)


def summarize_record(path: Path) -> RunSummary:
    """Read a packed record (:mod:`quarl.runs.record`) into a :class:`RunSummary`, as if it were its run directory."""
    rec = read_record(path)
    h = rec.header
    rows = tuple(rec.rows())
    val = [(r["step"], float(r["val/acc_strict"])) for r in rows if r.get("val/acc_strict") is not None]
    info = R.RunInfo(path=rec.path, id=rec.path.name, name=h["name"], seed=h["seed"], status=R.RunStatus(h["status"]),
                     step=int(h["step"]), total_steps=h["total_steps"], val_acc_first=val[0][1] if val else None,
                     val_acc_last=val[-1][1] if val else None, wall_s=h["wall_s"])
    return RunSummary(info, rec.config, rows, val[0][0] if val else None, val[-1][0] if val else None,
                      config_hash=h["config_hash"], record=rec)


def summarize(path: Path) -> RunSummary:
    """A run directory or a packed record, whichever ``path`` is."""
    return summarize_record(path) if is_record(path) else summarize_run(path)


def describe_config(config: dict) -> dict[str, str]:
    """The table's config columns: format, injection point, phase, STE, AQN (``fp32`` / ``—`` when unquantized)."""
    inj = config.get("injection")
    aqn = config.get("aqn")
    if not inj:
        out = {"format": "fp32", "injection": "—", "phase": "—", "ste": "—"}
    else:
        fmt = str(inj.get("error_type") or inj.get("scheme") or "?")
        out = {"format": fmt, "injection": str(inj.get("injection_point") or inj.get("scheme") or "?"),
               "phase": str(inj.get("apply_during", "?")), "ste": "on" if inj.get("use_ste", True) else "off"}
    if aqn and aqn.get("enabled", True):
        out["aqn"] = f"{aqn.get('schedule', 'qerl')} {aqn.get('sigma_start', '?'):g}→{aqn.get('sigma_end', '?'):g}" \
            if isinstance(aqn.get("sigma_start"), (int, float)) and isinstance(aqn.get("sigma_end"), (int, float)) \
            else "on"
    else:
        out["aqn"] = "off"
    return out


@dataclasses.dataclass(frozen=True)
class Group:
    """The seeds of one experiment and their estimates (points)."""

    key: str  # the experiment's name (run.name) or, unnamed, its config hash prefix
    runs: tuple[RunSummary, ...]
    description: str = ""

    @property
    def seeds(self) -> list[int]:
        return [r.info.seed for r in self.runs]

    @property
    def finished(self) -> tuple[RunSummary, ...]:
        return tuple(r for r in self.runs if r.info.status is R.RunStatus.FINISHED)

    @property
    def config(self) -> dict:
        return self.runs[0].config if self.runs else {}

    def accuracy(self, scorer: str, which: str) -> Estimate:
        """Step-0 or final accuracy over the finished seeds (one seed: its Wilson interval over problems)."""
        runs = [r for r in self.finished if r.acc(scorer, which) is not None]
        if len(runs) == 1:
            row = runs[0].val(scorer, which) or {}
            n = row.get("val/n")
            if isinstance(n, int) and n > 0:
                return accuracy_interval(round(float(row[f"val/acc_{scorer}"]) * n), n)
        return seed_interval([r.acc(scorer, which) for r in runs])

    def delta(self, scorer: str) -> Estimate:
        """final - step0 (points): t over seeds, or for one seed the paired bootstrap over its eval problems."""
        runs = [r for r in self.finished
                if r.acc(scorer, "final") is not None and r.acc(scorer, "step0") is not None
                and r.final_step != r.first_step]
        if len(runs) == 1:
            r = runs[0]
            before, after = r.eval_correct(r.first_step, scorer), r.eval_correct(r.final_step, scorer)
            if before and after:
                return paired_difference(before, after)
        if not runs:
            return MISSING
        return seed_interval([r.acc(scorer, "final") - r.acc(scorer, "step0") for r in runs])


def group_runs(runs: Sequence[RunSummary]) -> list[Group]:
    """Group run summaries by (name, config hash), in first-seen order; seeds sorted within a group."""
    groups: dict[tuple, list[RunSummary]] = {}
    for r in runs:
        h = r.config_hash or R.config_hash(r.config)
        groups.setdefault((r.info.name, h), []).append(r)
    out = []
    for (name, h), members in groups.items():
        members.sort(key=lambda r: (r.info.seed is None, r.info.seed))
        out.append(Group(key=name or h[:R.HASH_CHARS], runs=tuple(members)))
    return out


def metric_series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over a run's rows (rows lacking it are skipped)."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def summary_dict(group: Group) -> dict[str, Any]:
    """A JSON-able row for one group (used by CSV / JSON writers)."""
    out: dict[str, Any] = {"id": group.key, "description": group.description, **describe_config(group.config),
                           "n": len(group.finished), "seeds": group.seeds}
    for scorer in SCORERS:
        for which in ("step0", "final"):
            e = group.accuracy(scorer, which)
            out[f"{which}_{scorer}"], out[f"{which}_{scorer}_lo"], out[f"{which}_{scorer}_hi"] = e.mean, e.lo, e.hi
        d = group.delta(scorer)
        out[f"delta_{scorer}"], out[f"delta_{scorer}_lo"], out[f"delta_{scorer}_hi"] = d.mean, d.lo, d.hi
    return out
