"""`quarl plot`: PNG curves of a suite or of runs — validation accuracy, reward, AQN σ, mismatch KL vs step.

    quarl plot suites/e13.yaml [--root runs] [--evidence DIR] [--out curves.png]   # records + run directories
    quarl plot runs/E13c-*-s0 runs/E13f-*-s0 --out cmp.png

Lines are means over seeds, bands 95% CIs (needs the ``plot`` extra: matplotlib). Default output:
ROOT/suites/<name>/curves.png for a suite, ROOT/tables/curves.png for runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quarl.cli.suite import add_evidence_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="PNG curves (val accuracy, reward, sigma, mismatch KL) of a suite or of runs")
    p.add_argument("targets", nargs="+", type=Path, help="a suite YAML, or run directories (or directories of runs)")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where a suite's run directories live")
    p.add_argument("--out", type=Path, help="PNG path")
    add_evidence_argument(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from quarl.cli.table import collect
    from quarl.runs.plot import plot_groups

    try:
        title, groups, _, _, default_out = collect(args)
        path = plot_groups(groups, args.out or default_out / "curves.png", title=title)
    except ImportError as exc:
        print(f"quarl plot: {exc} (pip install 'quarl[plot]')", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"quarl plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
