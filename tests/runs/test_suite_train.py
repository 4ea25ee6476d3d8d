"""A suite driving the real `quarl.rl.train` on the testbed: run, skip when finished, resume when killed (slow, ~30 s).

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_suite_train.py -m slow -q
"""

import json

import pytest
import yaml
from _fabricate import dead_pid

from quarl.cli import main
from quarl.runs import registry as R

pytestmark = pytest.mark.slow

TINY = {"name": "tiny", "seeds": 1, "base": {
    "injection": {"scheme": "MXFP4", "apply_during": "both"},
    "grpo": {"steps": 2, "prompts_per_step": 2, "generations": 2, "max_new_tokens": 32},
    "eval": {"every": 2, "n": 8, "batch_size": 8}, "run": {"checkpoint_every": 1, "threads": 1}},
    "cells": [{"name": "t", "expect": "final - step0 >= -100"}]}


def test_suite_runs_the_trainer_then_skips_then_resumes(tmp_path, capsys):
    suite, root = tmp_path / "tiny.yaml", tmp_path / "runs"
    suite.write_text(yaml.safe_dump(TINY))
    assert main(["suite", str(suite), "--root", str(root)]) == 0
    (run,) = R.list_runs(root)
    assert run.status is R.RunStatus.FINISHED and run.step == 2 and run.name == "t"
    assert (run.path / "eval" / "step-0.jsonl").exists() and (run.path / "eval" / "step-2.jsonl").exists()
    info = json.loads((run.path / "run.json").read_text())
    assert info["config_hash"][:10] in run.id  # the suite's resolution and the trainer's agree on the id
    out = capsys.readouterr().out
    assert "| t |" in out and "| 1/1 | PASSED |" in out
    assert main(["suite", str(suite), "--root", str(root)]) == 0
    assert "1 runs: 0 to run, 0 to resume, 1 to skip" in capsys.readouterr().out
    # a SIGKILL after the last checkpoint: no exit record, a dead owner -> resumed from checkpoint-2 and finished
    (run.path / "exit.json").unlink()
    hb = json.loads((run.path / "heartbeat.json").read_text())
    (run.path / "heartbeat.json").write_text(json.dumps({**hb, "pid": dead_pid()}))
    assert R.run_status(run.path) is R.RunStatus.KILLED
    assert main(["suite", str(suite), "--root", str(root)]) == 0
    assert "0 to run, 1 to resume, 0 to skip" in capsys.readouterr().out
    assert R.run_status(run.path) is R.RunStatus.FINISHED
