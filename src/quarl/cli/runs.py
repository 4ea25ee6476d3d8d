"""`quarl runs`: every run under a root, with its computed status, step, validation accuracy and wall time.

    quarl runs [--root runs] [--name 'E13*'] [--status killed] [--json]

Status is computed from each run's files (exit record, heartbeat pid / age), never typed by hand; a killed run
can be continued with ``quarl train --resume DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list runs: id, name, status (computed), step, val accuracy first/last, wall time")
    p.add_argument("--root", type=Path, default=Path("runs"), help="directory holding run directories (any depth)")
    p.add_argument("--name", help="glob on the run name or id (e.g. 'E13*')")
    p.add_argument("--status", choices=["running", "finished", "failed", "killed"], help="only runs with this status")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.set_defaults(func=_run)


def _fmt_acc(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _fmt_wall(s: float | None) -> str:
    if s is None:
        return "—"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _run(args: argparse.Namespace) -> int:
    from quarl.runs import list_runs

    runs = list_runs(args.root)
    if args.name:
        runs = [r for r in runs if fnmatch.fnmatch(r.name or "", args.name) or fnmatch.fnmatch(r.id, args.name)]
    if args.status:
        runs = [r for r in runs if r.status.value == args.status]
    if args.json:
        for r in runs:
            d = dataclasses.asdict(r)
            print(json.dumps({**d, "path": str(r.path), "status": r.status.value}))
        return 0
    if not runs:
        print(f"no runs under {args.root}" + (" matching the filters" if args.name or args.status else ""))
        return 0
    head = ("id", "name", "status", "step", "val first %", "val last %", "wall")
    rows = [(r.id, r.name or "—", r.status.value, f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step),
             _fmt_acc(r.val_acc_first), _fmt_acc(r.val_acc_last), _fmt_wall(r.wall_s)) for r in runs]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in (head, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    killed = [r for r in runs if r.status.value == "killed"]
    if killed:
        print(f"\n{len(killed)} killed; continue one with: quarl train --resume {killed[0].path}")
    return 0
