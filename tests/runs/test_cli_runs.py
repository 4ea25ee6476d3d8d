"""`quarl runs | suite | table | plot` end to end: fabricated runs, the real config resolution, a fake trainer.

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_cli_runs.py -q
"""

import csv
import json
from pathlib import Path

import pytest
import yaml
from _fabricate import BASE_CONFIG, dead_pid, make_run, write_run

import quarl.cli.suite as suite_cli
from quarl.cli import main
from quarl.runs import registry as R

SUITES = Path(__file__).resolve().parents[2] / "suites"


def _real_fake_train(config, overrides, out_dir, resume):
    """quarl.rl.train's contract with quarl's real config resolution; the gain is grpo.lr * 1e5 points."""
    if resume is not None:
        assert config is None and not overrides and out_dir is None
        R.clear_exit(resume)
        R.mark_exit(resume, "finished", 8)
        return Path(resume)
    from quarl.rl.config import load_config

    cfg = load_config(config, overrides).to_dict()
    gain = cfg["grpo"]["lr"] * 1e5 + 0.5 * (cfg["run"]["seed"] - 1)
    return write_run(Path(out_dir), cfg, val={0: 0.5, 8: 0.5 + gain / 100}, n_problems=1000)


@pytest.fixture
def fake_trainer(monkeypatch):
    monkeypatch.setattr(suite_cli, "trainer", lambda: _real_fake_train)


def _cfg(**grpo):
    return {**BASE_CONFIG, "grpo": {**BASE_CONFIG["grpo"], **grpo}}


def _write_suite(tmp_path):
    data = {"name": "mini", "description": "two cells", "seeds": 3, "base": {"grpo": {"steps": 8}},
            "cells": [{"name": "gain", "description": "recovers", "set": {"injection.scheme": "MXFP4"},
                       "expect": "final - step0 >= 3"},
                      {"name": "ctrl", "description": "control", "set": {"grpo.lr": 1.0e-6},
                       "expect": "final - step0 <= 1"}]}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_suite_resolves(capsys, tmp_path):
    files = sorted(SUITES.glob("*.yaml"))
    assert files, "suites/ ships e13.yaml"
    for f in files:
        assert main(["suite", str(f), "--dry-run", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # e13: 9 cells x 3 seeds, some of them possibly committed records already (evidence/e13)
    assert "suite e13: 9 cells x 3 seeds" in out and "\n27 runs: " in out and "E13h-w4a4-mxfp4-noste-" in out


def test_suite_typo_names_the_nearest_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "seeds": 1, "base": {}, "cells": [{"name": "x",
                                                                                   "set": {"grpo.lrr": 1}}]}))
    assert main(["suite", str(bad), "--dry-run", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cell 'x'" in err and "'lr'" in err


def test_suite_runs_skips_resumes_and_tables(tmp_path, capsys, fake_trainer):
    suite, root = _write_suite(tmp_path), tmp_path / "runs"
    assert main(["suite", str(suite), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "6 runs: 6 to run" in out and "[6/6] done" in out
    gain = next(line for line in out.splitlines() if line.startswith("| gain |"))
    ctrl = next(line for line in out.splitlines() if line.startswith("| ctrl |"))
    # gain: lr 1e-4 -> +10 points, seeds -0.5/0/+0.5 -> t CI 10 ± 1.2 -> PASSED; control: +0.1 ± 1.2 -> INCONCLUSIVE
    assert "| mxfp4 | both | both | on | off |" in gain and "+10.0 ± 1.2" in gain and gain.endswith("| 3/3 | PASSED |")
    assert "| fp32 |" in ctrl and "INCONCLUSIVE" in ctrl
    assert (root / "suites" / "mini" / "table.md").read_text().count("| gain |") == 1
    # second invocation: nothing to do; a killed run is resumed
    victim = next(root.glob("gain-*-s1"))
    (victim / "exit.json").unlink()
    hb = json.loads((victim / "heartbeat.json").read_text())
    (victim / "heartbeat.json").write_text(json.dumps({**hb, "pid": dead_pid()}))
    assert main(["runs", "--root", str(root), "--status", "killed"]) == 0
    listing = capsys.readouterr().out
    assert victim.name in listing and f"quarl train --resume {victim}" in listing
    assert main(["suite", str(suite), "--root", str(root), "--seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 runs: 0 to run, 1 to resume, 5 to skip" in out and f"resume  {victim.name}" in out
    assert R.run_status(victim) is R.RunStatus.FINISHED
    # table and plot of the suite
    assert main(["table", str(suite), "--root", str(root), "--out", str(tmp_path / "t")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "t" / "table.csv")))
    assert [r["id"] for r in rows] == ["gain", "ctrl"] and rows[0]["status"] == "PASSED"
    assert abs(float(rows[0]["delta_strict"]) - 10.0) < 1e-9 and rows[0]["n"] == "3"
    assert main(["plot", str(suite), "--root", str(root), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_listing_and_filters(tmp_path, capsys):
    make_run(tmp_path, config=_cfg(lr=1e-4), name="E13a", val={0: 0.25, 8: 0.5})
    make_run(tmp_path, config=_cfg(lr=2e-4), name="E13b", status="failed")
    make_run(tmp_path, config=_cfg(lr=3e-4), name="X1", status="killed")
    assert main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "name", "status", "step", "val", "first", "%", "val", "last", "%", "wall"]
    e13a = next(line for line in out if line.startswith("E13a-"))
    assert e13a.split()[1:6] == ["E13a", "finished", "8/8", "25.0", "50.0"]
    assert main(["runs", "--root", str(tmp_path), "--name", "E13*", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["name"], r["status"]) for r in rows) == [("E13a", "finished"), ("E13b", "failed")]
    assert main(["runs", "--root", str(tmp_path / "none")]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_table_and_plot_of_ad_hoc_runs(tmp_path, capsys):
    a0 = make_run(tmp_path, config=_cfg(lr=1e-4), name="A", seed=0, val={0: 0.5, 8: 0.6}, n_problems=100)
    make_run(tmp_path, config=_cfg(lr=2e-4), name="B", seed=0, val={0: 0.5, 8: 0.5}, n_problems=100, sigma=False)
    assert main(["table", str(tmp_path), "--out", str(tmp_path / "tab")]) == 0
    out = capsys.readouterr().out
    a = next(line for line in out.splitlines() if line.startswith("| A |"))
    # one seed: Wilson over problems for accuracies, paired bootstrap over problems for Δ
    assert "| 50.0 [40.4, 59.6] | 60.0 [50.2, 69.1] |" in a and "| +10.0 [" in a and "| 1 | finished |" in a
    assert "paired bootstrap over problems" in out
    assert main(["plot", str(a0), str(tmp_path / "nothing")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
