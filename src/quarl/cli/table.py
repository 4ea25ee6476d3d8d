"""`quarl table`: the seed-style results table, computed from run directories — stdout, Markdown and CSV.

    quarl table suites/e13.yaml [--root runs] [--evidence DIR] [--out DIR]   # one row per cell, vs expectation
    quarl table runs/E13c-*-s0 evidence/e13/E13c-*-s1 ...    # ad-hoc runs or records, by (name, config hash)

A suite's finished runs are its committed records (``evidence/<suite name>/``, written by ``quarl runs pack``) and
its run directories under ``--root``; a clean clone has only the records, and that is enough. Intervals: Student t
over seeds; with one seed, Wilson (accuracy) and the paired bootstrap over validation problems (Δ), the one paired
method of :mod:`quarl.runs.stats`.

Each accuracy is mean ± 95% CI over the finished seeds (n shown), or one seed's interval over validation problems.
Files: ``table.md`` and ``table.csv`` in ``--out`` (default ROOT/suites/<name>/ for a suite, ROOT/tables/ for runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quarl.cli.suite import add_evidence_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("table", help="results table (mean ± 95%% CI over seeds, Δ, status) of a suite or of runs")
    p.add_argument("targets", nargs="+", type=Path, help="a suite YAML, or run directories (or directories of runs)")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where a suite's run directories live")
    p.add_argument("--out", type=Path, help="directory for table.md / table.csv")
    add_evidence_argument(p)
    p.set_defaults(func=_run)


def is_suite(targets: list[Path]) -> bool:
    return len(targets) == 1 and targets[0].suffix in (".yaml", ".yml") and targets[0].is_file()


def collect(args: argparse.Namespace):
    """(title, groups, rows, metric, default output directory) for a suite file or for run directories."""
    from quarl.runs.table import run_groups, run_rows, suite_groups, suite_rows

    if is_suite(args.targets):
        from quarl.cli.suite import load

        suite, planned = load(argparse.Namespace(file=args.targets[0], root=args.root,
                                                 evidence=getattr(args, "evidence", None)))
        by_cell = suite_groups(planned)
        rows = suite_rows(suite, by_cell)
        title = f"suite {suite.name}: {suite.description}".rstrip(": ")
        return title, [r.group for r in rows], rows, suite.metric, args.root / "suites" / suite.name
    groups = run_groups(args.targets)
    return f"{sum(len(g.runs) for g in groups)} runs", groups, run_rows(groups), "strict", args.root / "tables"


def _run(args: argparse.Namespace) -> int:
    from quarl.runs.table import markdown, write_csv

    try:
        title, _, rows, metric, default_out = collect(args)
    except (ValueError, OSError) as exc:
        print(f"quarl table: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("quarl table: no runs found", file=sys.stderr)
        return 2
    text = markdown(rows, metric, title=title)
    print(text, end="")
    out = args.out or default_out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    write_csv(rows, out / "table.csv")
    print(f"wrote {out / 'table.md'} and {out / 'table.csv'}")
    return 0
