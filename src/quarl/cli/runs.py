"""`quarl runs`: list runs with their computed status; `quarl runs pack`: reduce finished runs to committed records.

    quarl runs [--root runs] [--name 'E13*'] [--status killed] [--json]
    quarl runs pack RUN_DIR... --into evidence/<suite name>

Status is computed from each run's files (exit record, heartbeat pid / age), never typed by hand; a killed run
can be continued with ``quarl train --resume DIR``.

``pack`` writes, per finished run, ``<into>/<run id>/config.yaml`` (the resolved config, verbatim) and
``record.jsonl`` (one line per validation step with which problems were correct as a bitset, plus a few per-step
training metrics; format in :mod:`quarl.runs.record`). The run id is the one ``quarl suite`` plans today (the run's
config re-resolved by `quarl train`'s loader), so ``quarl suite`` / ``quarl table`` / ``quarl plot`` of the suite find
the record. A RUN_DIR that is not a run contributes every run below it; unfinished runs are listed and skipped;
an identical record already there is left alone, a different one is an error. Commit ``<into>``: tables and curves
of the suite then need nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list runs: id, name, status (computed), step, val accuracy first/last, wall time")
    p.add_argument("--root", type=Path, default=Path("runs"), help="directory holding run directories (any depth)")
    p.add_argument("--name", help="glob on the run name or id (e.g. 'E13*')")
    p.add_argument("--status", choices=["running", "finished", "failed", "killed"], help="only runs with this status")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.set_defaults(func=_run)
    sub_runs = p.add_subparsers(dest="runs_command", metavar="{pack}")
    k = sub_runs.add_parser("pack", help="pack finished runs into compact records to commit (evidence/<suite>)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("runs", nargs="+", type=Path, help="run directories (or directories of runs)")
    k.add_argument("--into", type=Path, required=True, help="record directory, e.g. evidence/<suite name>")
    k.set_defaults(func=_pack)


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


def _record_name(run_dir: Path, info) -> str:
    """The run id `quarl suite` plans for this run today: its config.yaml re-resolved by `quarl train`'s loader."""
    from quarl.cli.suite import resolver
    from quarl.runs import run_id

    if info.seed is None:
        return info.id
    return run_id(resolver()(run_dir / "config.yaml", []), info.seed, info.name)


def _pack(args: argparse.Namespace) -> int:
    from quarl.runs import RunStatus, list_runs, read_run
    from quarl.runs.record import pack_run

    dirs = []
    for path in args.runs:
        if (path / "run.json").exists():
            dirs.append(path)
        elif path.is_dir() and (found := [r.path for r in list_runs(path)]):
            dirs.extend(found)
        else:
            print(f"quarl runs pack: {path}: not a run directory and no run below it", file=sys.stderr)
            return 2
    counts = {"packed": 0, "unchanged": 0, "skipped": 0, "failed": 0}
    for run_dir in dirs:
        try:
            info = read_run(run_dir)
            if info.status is not RunStatus.FINISHED:
                print(f"skip       {run_dir} ({info.status.value}: only finished runs are packed)")
                counts["skipped"] += 1
                continue
            dest, written = pack_run(run_dir, args.into, _record_name(run_dir, info))
        except (ValueError, OSError, TypeError, KeyError) as exc:
            print(f"FAILED     {run_dir}: {exc}", file=sys.stderr)
            counts["failed"] += 1
            continue
        counts["packed" if written else "unchanged"] += 1
        print(f"{'packed' if written else 'unchanged':<10} {run_dir} -> {dest}")
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0
