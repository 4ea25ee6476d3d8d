"""The results table of a study, computed instead of kept by hand: one row per experiment, mean ± 95% CI over seeds.

Columns: ID, description, format, injection point, phase, STE, AQN, validation accuracy at step 0 and final (strict
and flexible), Δ = final - step 0 (of the suite's scorer), n (finished seeds), status (PASSED / FAILED /
INCONCLUSIVE against the declared expectation, or the run status when there is none). Accuracies are points (0-100).
With ≥ 2 seeds each cell is ``mean ± half-width`` of the Student t interval over seeds; with one seed it is
``value [lo, hi]`` of the within-run interval (Wilson; paired bootstrap over problems for Δ).

Rendering: :func:`markdown` (also what the CLI prints) and :func:`write_csv` (one numeric column per mean / lo / hi,
so a spreadsheet never has to parse "56.4 ± 4.3").
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from quarl.mdtable import render_table
from quarl.runs import registry as R
from quarl.runs.record import is_record, list_records
from quarl.runs.results import SCORERS, Group, describe_config, group_runs, summarize, summary_dict
from quarl.runs.runner import PlannedRun
from quarl.runs.stats import Estimate
from quarl.runs.suite import NO_EXPECTATION, Cell, Suite, Verdict, judge_cell

CONFIG_COLUMNS = ("format", "injection", "phase", "ste", "aqn")


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a group of seeds, its estimates and its status."""

    group: Group
    description: str
    step0: dict[str, Estimate]  # scorer -> estimate
    final: dict[str, Estimate]
    delta: dict[str, Estimate]
    n: int  # finished seeds
    n_expected: int | None  # declared seeds (suites), None for ad-hoc runs
    status: str  # PASSED / FAILED / INCONCLUSIVE, or the runs' statuses
    reason: str  # why (expectation with CI, seeds missing, ...)


def _run_statuses(group: Group) -> str:
    counts: dict[str, int] = {}
    for r in group.runs:
        counts[r.info.status.value] = counts.get(r.info.status.value, 0) + 1
    return ", ".join(f"{k} {v}" if len(group.runs) > 1 else k for k, v in counts.items()) or "missing"


def row_for(group: Group, cell: Cell | None = None, n_seeds: int | None = None, metric: str = "strict") -> Row:
    """Build a row; with a suite ``cell`` the status is its verdict over ``n_seeds`` declared seeds."""
    step0 = {s: group.accuracy(s, "step0") for s in SCORERS}
    final = {s: group.accuracy(s, "final") for s in SCORERS}
    delta = {s: group.delta(s) for s in SCORERS}
    n = len(group.finished)
    if cell is None:
        return Row(group, group.description, step0, final, delta, n, None, _run_statuses(group), "")
    estimates = {"final - step0": delta[metric], "final": final[metric], "step0": step0[metric]}
    verdict, reason = judge_cell(cell, estimates, n, n_seeds or n)
    status = verdict.value if cell.expect else _run_statuses(group)
    if verdict is Verdict.INCONCLUSIVE and cell.expect and n < (n_seeds or n):
        status = f"{verdict.value} ({n}/{n_seeds})"
    return Row(group, cell.description, step0, final, delta, n, n_seeds, status, reason)


def suite_groups(planned: Sequence[PlannedRun]) -> dict[str, Group]:
    """The existing runs (directories or committed records) of a suite plan, grouped by cell (no run: absent)."""
    by_cell: dict[str, list] = {}
    for p in planned:
        if (p.path / R.RUN_FILE).exists() or is_record(p.path):
            by_cell.setdefault(p.cell.name, []).append(summarize(p.path))
    cells = {p.cell.name: p.cell for p in planned}
    return {name: Group(name, tuple(runs), cells[name].description) for name, runs in by_cell.items()}


def suite_rows(suite: Suite, groups_by_cell: dict[str, Group]) -> list[Row]:
    """Rows for every cell of a suite, in declared order (a cell with no runs yet gets an empty row)."""
    return [row_for(groups_by_cell.get(c.name) or Group(c.name, (), c.description), c, len(suite.seeds_of(c)),
                    suite.metric) for c in suite.cells]


def run_groups(paths: Sequence[Path]) -> list[Group]:
    """Groups for ad-hoc run directories or records; a directory that is neither contributes every one below it."""
    runs = []
    for path in paths:
        path = Path(path)
        if (path / R.RUN_FILE).exists() or is_record(path):
            runs.append(summarize(path))
        elif path.is_dir():
            found = [summarize(info.path) for info in R.list_runs(path)] + [summarize(p) for p in list_records(path)]
            if not found:
                raise FileNotFoundError(f"{path}: no run directory or packed record in it")
            runs.extend(found)
        else:
            raise FileNotFoundError(f"{path}: neither a run directory, a record, nor a directory of them")
    return group_runs(runs)


def run_rows(groups: Sequence[Group]) -> list[Row]:
    """Rows for ad-hoc runs (``quarl table RUN...``): one per (name, config hash), status = the runs' statuses."""
    return [row_for(g) for g in groups]


def _headers(metric: str) -> list[str]:
    return ["ID", "description", "format", "injection", "phase", "STE", "AQN", "step 0 strict", "final strict",
            "step 0 flexible", "final flexible", f"Δ {metric}", "n", "status"]


def _cells(row: Row, metric: str) -> list[str]:
    cfg = describe_config(row.group.config) if row.group.runs else {k: "" for k in CONFIG_COLUMNS}
    n = f"{row.n}/{row.n_expected}" if row.n_expected else str(row.n)
    d = row.delta[metric]
    delta = d.fmt() if math.isnan(d.mean) else ("+" if d.mean > 0 else "") + d.fmt()
    return [row.group.key, row.description, *(cfg[k] for k in CONFIG_COLUMNS),
            row.step0["strict"].fmt(), row.final["strict"].fmt(), row.step0["flexible"].fmt(),
            row.final["flexible"].fmt(), delta, n, row.status]


def markdown(rows: Sequence[Row], metric: str = "strict", title: str | None = None) -> str:
    """A Markdown table (with a legend under it saying what the intervals are)."""
    head = _headers(metric)
    lines = [f"### {title}", ""] if title else []
    lines += [render_table(head, [_cells(row, metric) for row in rows]).rstrip("\n")]
    kinds = sorted({e.ci for r in rows for e in (*r.step0.values(), *r.final.values(), *r.delta.values())
                    if e.ci != "none"})
    lines += ["", "Validation accuracy in points (0-100), finished runs only; "
                  "`±`: 95% Student t interval over seeds; `[lo, hi]`: one seed's interval over validation problems "
                  f"(evaluation noise only). Intervals used: {', '.join(kinds) or 'none'}."]
    reasons = [f"- {r.group.key}: {r.reason}" for r in rows if r.reason and r.reason != NO_EXPECTATION]
    if reasons:
        lines += ["", "Status against the declared expectations:", *reasons]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per row; every estimate as separate mean / lo / hi columns (points)."""
    dicts = [{**summary_dict(r.group), "description": r.description, "status": r.status, "reason": r.reason,
              "n_expected": r.n_expected} for r in rows]
    fields = list(dict.fromkeys(k for d in dicts for k in d))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for d in dicts:
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                            " ".join(map(str, v)) if isinstance(v, list) else v) for k, v in d.items()})
    return path


def status_counts(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows have each verdict (PASSED / FAILED / INCONCLUSIVE) - for the CLI's exit code and summary."""
    out: dict[str, int] = {}
    for r in rows:
        key = r.status.split(" ")[0]
        if key in {v.value for v in Verdict}:
            out[key] = out.get(key, 0) + 1
    return out

