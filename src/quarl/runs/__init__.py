"""Experiments that cannot get lost: the run registry, suites of seeded runs, tables and plots.

:mod:`quarl.runs.registry` gives every run a directory named after its config hash and seed, and computes its status
from the files the trainer leaves there; :mod:`quarl.runs.record` packs a finished run into a small committed record
that suites, tables and plots read like the run itself. Imports: configio, data, eval only (never rl or cli).
"""

from quarl.runs.registry import (
    RunExistsError,
    RunFinishedError,
    RunInfo,
    RunStatus,
    append_metrics,
    clear_exit,
    config_hash,
    create_run,
    heartbeat,
    list_runs,
    mark_exit,
    read_metrics,
    read_run,
    run_id,
    run_status,
)

__all__ = ["RunExistsError", "RunFinishedError", "RunInfo", "RunStatus", "append_metrics", "clear_exit",
           "config_hash", "create_run", "heartbeat", "list_runs", "mark_exit", "read_metrics", "read_run", "run_id",
           "run_status"]
