"""`quarl suite`: run a suite of seeded experiments — missing runs run, finished ones are skipped, killed ones resume.

    quarl suite suites/e13.yaml [--seeds N] [--jobs J] [--dry-run] [--root runs] [--retry-failed] [--evidence DIR]

A (cell, seed) whose packed record is committed under ``EVIDENCE/<suite name>/`` (default EVIDENCE: the
``evidence/`` directory beside the suite file's directory, i.e. the repository's ``evidence/`` for
``suites/X.yaml``; see ``quarl runs pack``) counts as finished and is skipped, so a fresh checkout continues a
suite where its records end. Each (cell, seed) resolves through `quarl train`'s own strict config loader, so a typo in a cell is an error naming
the nearest valid key before anything runs; its run directory is ``ROOT/<name>-<config hash>-s<seed>``. At the end
the suite's table (mean ± 95% CI over seeds, status against the declared expectations) is printed and written to
``ROOT/suites/<suite name>/table.md`` and ``table.csv``. Exit status: 0 when every run succeeded and no cell FAILED,
1 otherwise, 2 for an invalid suite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suite", help="run a suite YAML: run missing, resume killed, skip finished; then its table")
    p.add_argument("file", type=Path, help="suite YAML (e.g. suites/e13.yaml)")
    p.add_argument("--seeds", type=int, help="use N seeds (the first N declared, extended with the next integers)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (separate processes)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (run ids, status, action) and stop")
    p.add_argument("--root", type=Path, default=Path("runs"), help="where run directories live")
    p.add_argument("--retry-failed", action="store_true", help="also resume runs that failed (default: report them)")
    add_evidence_argument(p)
    p.set_defaults(func=_run)


def add_evidence_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--evidence", type=Path, help="directory of committed records, one subdirectory per suite "
                                                 "(default: evidence/ beside the suite file's directory)")


def evidence_dir(suite, evidence: Path | None) -> Path:
    """Where a suite's committed records live: EVIDENCE/<suite name> (see the module docstring for the default)."""
    if evidence is None:
        evidence = Path(suite.path).resolve().parent.parent / "evidence"
    return Path(evidence) / suite.name


def resolver():
    """`quarl train`'s resolution: (base config, overrides) -> the resolved config dict the trainer hashes."""
    from quarl.rl.config import load_config

    return lambda base, overrides: load_config(str(base) if isinstance(base, Path) else base, overrides).to_dict()


def trainer():
    """The function that runs one training (``quarl.rl.train``); tests replace it."""
    from quarl.rl import train

    return train


def load(args: argparse.Namespace):
    """Load the suite (with ``--seeds``) and plan it; raises ValueError / OSError for an invalid suite."""
    from quarl.runs.runner import plan
    from quarl.runs.suite import load_suite

    suite = load_suite(args.file)
    if getattr(args, "seeds", None):
        suite = suite.with_seeds(args.seeds)
    return suite, plan(suite, resolver(), args.root, retry_failed=getattr(args, "retry_failed", False),
                       evidence=evidence_dir(suite, getattr(args, "evidence", None)))


def print_plan(planned) -> None:
    from quarl.runs.runner import Action

    counts = {a: sum(p.action is a for p in planned) for a in Action}
    committed = sum(p.committed for p in planned)
    print(f"{len(planned)} runs: {counts[Action.RUN]} to run, {counts[Action.RESUME]} to resume, "
          f"{counts[Action.SKIP]} to skip" + (f" ({committed} committed records)" if committed else ""))
    width = max(len(p.run_id) for p in planned)
    for p in planned:
        print(f"  {p.action.value:<6}  {p.run_id:<{width}}  ({p.reason})")


def write_tables(suite, planned, root: Path) -> tuple[str, list]:
    """The suite's rows, printed as Markdown and written under ROOT/suites/<name>/; returns (markdown, rows)."""
    from quarl.runs.table import markdown, suite_groups, suite_rows, write_csv

    rows = suite_rows(suite, suite_groups(planned))
    text = markdown(rows, suite.metric, title=f"suite {suite.name}: {suite.description}".rstrip(": "))
    out = root / "suites" / suite.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    write_csv(rows, out / "table.csv")
    return text, rows


def _run(args: argparse.Namespace) -> int:
    from quarl.runs.runner import Action, execute
    from quarl.runs.table import status_counts

    try:
        suite, planned = load(args)
    except (ValueError, OSError) as exc:
        print(f"quarl suite: {exc}", file=sys.stderr)
        return 2
    own = sum(c.seeds is not None for c in suite.cells)
    print(f"suite {suite.name}: {len(suite.cells)} cells x {len(suite.seeds)} seeds {list(suite.seeds)}"
          + (f" ({own} cells with their own seeds)" if own else ""))
    print_plan(planned)
    if args.dry_run:
        return 0
    todo = [p for p in planned if p.action is not Action.SKIP]
    done = iter(range(1, len(todo) + 1))

    def on_event(kind, p, detail):
        if kind == "start" and args.jobs == 1:
            print(f"\n[{p.action.value}] {p.run_id}", flush=True)
        elif kind != "start":
            print(f"[{next(done)}/{len(todo)}] {kind}: {p.run_id}" + (f" — {detail}" if kind == "failed" else ""),
                  flush=True)

    outcomes = execute(suite, planned, trainer(), jobs=args.jobs, on_event=on_event)
    _, planned = load(args)  # statuses after the runs
    text, rows = write_tables(suite, planned, args.root)
    print("\n" + text, end="")
    print(f"wrote {args.root / 'suites' / suite.name}/table.md and table.csv")
    failed = [o for o in outcomes if o.error]
    counts = status_counts(rows)
    if failed:
        print(f"{len(failed)} run(s) failed; `quarl runs --root {args.root} --status failed` lists them",
              file=sys.stderr)
    return 1 if failed or counts.get("FAILED") else 0
