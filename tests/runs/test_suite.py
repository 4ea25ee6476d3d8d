"""Suites: strict parsing, grid expansion, expectations judged from seed CIs, planning and running (fake trainer).

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_suite.py -q
"""

import doctest
import json
import math

import pytest
import yaml
from _fabricate import BASE_CONFIG, dead_pid, fake_resolve, fake_train

from quarl.runs import registry as R
from quarl.runs import runner as X
from quarl.runs import suite as S
from quarl.runs.stats import Estimate


def _suite(tmp_path, **extra):
    data = {"name": "t", "base": BASE_CONFIG, "seeds": 3, "cells": [
        {"name": "gain", "set": {"grpo.effect": 10}, "expect": "final - step0 >= 3"},
        {"name": "control", "set": {"grpo.effect": -5.0}, "expect": "final - step0 <= 1"},
        {"name": "wrong", "set": {"grpo.effect": -4.0}, "expect": ["final - step0 >= 3"]},
        {"name": "unsure", "set": {"grpo.effect": 1.0}, "expect": "final - step0 >= 1"},
    ], **extra}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return S.load_suite(path)


def test_doctests():
    assert doctest.testmod(S).failed == 0


def test_strict_keys_name_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'cells'"):
        S.parse_suite({"name": "x", "base": {}, "seeds": 1, "cell": []})
    with pytest.raises(ValueError, match="did you mean 'set'"):
        S.parse_suite({"name": "x", "base": {}, "seeds": 1, "cells": [{"name": "a", "sets": {}}]})
    with pytest.raises(ValueError, match="did you mean 'strict'"):
        S.parse_suite({"name": "x", "base": {}, "seeds": 1, "metric": "strct"})
    with pytest.raises(ValueError, match="missing required key 'seeds'"):
        S.parse_suite({"name": "x", "base": {}})
    with pytest.raises(ValueError, match="duplicate cell names"):
        S.parse_suite({"name": "x", "base": {}, "seeds": 1, "cells": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ValueError, match=r"A-Za-z0-9"):
        S.parse_suite({"name": "x", "base": {}, "seeds": 1, "cells": [{"name": "a b"}]})
    with pytest.raises(ValueError, match="seeds"):
        S.parse_suite({"name": "x", "base": {}, "seeds": [1, 1]})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        S.parse_suite({"name": "x", "base": "nope.yaml", "seeds": 1})


@pytest.mark.parametrize("text", ["final - step0 > 3", "final >= three", "mean >= 3", "final - step0 >= 3 points"])
def test_bad_expectations_explain_the_grammar(text):
    with pytest.raises(ValueError, match="TERM OP NUMBER"):
        S.parse_expectation(text)


def test_grid_expansion_names_overrides_and_seeds(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    suite = S.parse_suite({
        "name": "g", "base": "base.yaml", "seeds": [5, 7], "grid": {"injection.error_type": ["mxfp4", "nvfp4"]},
        "expect": "final >= 50",
        "cells": [{"name": "A", "set": {"injection.use_ste": False, "grpo.lr": 1e-5}},
                  {"name": "B", "grid": {"aqn": [None]}, "expect": "final - step0 <= 1"}]}, base_dir=tmp_path)
    assert suite.base == tmp_path / "base.yaml"
    assert [c.name for c in suite.cells] == ["A-mxfp4", "A-nvfp4", "B-mxfp4-none", "B-nvfp4-none"]
    a = suite.cell("A-nvfp4")
    assert a.overrides == ("injection.use_ste=false", "grpo.lr=1.0e-05", "injection.error_type=nvfp4")
    assert str(a.expect[0]) == "final >= 50" and str(suite.cell("B-mxfp4-none").expect[0]) == "final - step0 <= 1"
    assert "injection.error_type=nvfp4" in a.description
    cfg = fake_resolve(suite.base, list(a.overrides))
    assert cfg["grpo"]["lr"] == 1e-5 and cfg["injection"]["use_ste"] is False  # values survive as typed
    runs = suite.runs()
    assert len(runs) == 8 and runs[1] == ("A-mxfp4", a.overrides[:2] + ("injection.error_type=mxfp4", "run.seed=7",
                                                                         "run.name=A-mxfp4"), 7)
    assert suite.with_seeds(1).seeds == (5,) and suite.with_seeds(4).seeds == (5, 7, 8, 9)


@pytest.mark.parametrize("op,thr,lo,hi,want", [
    (">=", 3, 3.0, 9.0, "PASSED"), (">=", 3, -1.0, 2.9, "FAILED"), (">=", 3, 2.0, 4.0, "INCONCLUSIVE"),
    ("<=", 1, -3.0, 1.0, "PASSED"), ("<=", 1, 1.1, 5.0, "FAILED"), ("<=", 1, 0.0, 2.0, "INCONCLUSIVE")])
def test_expectation_judged_on_the_whole_interval(op, thr, lo, hi, want):
    e = S.Expectation("final - step0", op, thr)
    assert e.judge(Estimate((lo + hi) / 2, lo, hi, 3, "t over seeds")) is S.Verdict(want)
    # a point value without an interval is never conclusive
    assert e.judge(Estimate(100.0, 100.0, 100.0, 1, "none")) is S.Verdict.INCONCLUSIVE
    assert e.judge(Estimate(math.nan, math.nan, math.nan, 0, "none")) is S.Verdict.INCONCLUSIVE


def test_yaml_scalar_round_trips():
    for v in (1e-5, 0.01, 3, -2.5e-12, True, None, "W4A4", "1e-5", "null", [1, 2], {"a": 1}):
        assert yaml.safe_load(S.yaml_scalar(v)) == v
    with pytest.raises(ValueError):
        S.yaml_scalar(object())


def test_plan_execute_skip_and_resume(tmp_path):
    suite = _suite(tmp_path)
    root = tmp_path / "runs"
    planned = X.plan(suite, fake_resolve, root)
    assert [p.action for p in planned] == [X.Action.RUN] * 12 and len({p.run_id for p in planned}) == 12
    assert planned[0].run_id.startswith("gain-") and planned[0].run_id.endswith("-s0")
    events = []
    outcomes = X.execute(suite, planned, fake_train, on_event=lambda k, p, d: events.append((k, p.run_id)))
    assert all(o.error is None and o.path == o.planned.path for o in outcomes)
    assert [k for k, _ in events].count("done") == 12
    again = X.plan(suite, fake_resolve, root)
    assert all(p.action is X.Action.SKIP and p.status is R.RunStatus.FINISHED for p in again)
    # kill one run: it is resumed, the rest skipped
    victim = again[4].path
    (victim / "exit.json").unlink()
    hb = json.loads((victim / "heartbeat.json").read_text())
    (victim / "heartbeat.json").write_text(json.dumps({**hb, "pid": dead_pid()}))
    third = X.plan(suite, fake_resolve, root)
    assert [p.action for p in third].count(X.Action.RESUME) == 1 and third[4].action is X.Action.RESUME
    (out,) = X.execute(suite, third, fake_train)
    assert out.error is None and R.run_status(victim) is R.RunStatus.FINISHED


def test_failures_are_reported_and_do_not_stop_the_suite(tmp_path):
    suite = S.parse_suite({"name": "f", "base": BASE_CONFIG, "seeds": 1, "cells": [
        {"name": "bad", "set": {"grpo.crash": True}}, {"name": "ok", "set": {"grpo.effect": 1}}]})
    outcomes = X.execute(suite, X.plan(suite, fake_resolve, tmp_path), fake_train)
    assert outcomes[0].error == "RuntimeError: boom: the fake trainer crashed" and outcomes[1].error is None


def test_plan_rejects_invalid_overrides_and_identical_cells(tmp_path):
    bad = S.parse_suite({"name": "b", "base": BASE_CONFIG, "seeds": 1, "cells": [{"name": "x", "set": {"grop.lr": 1}}]})
    with pytest.raises(ValueError, match="cell 'x': unknown key 'grop'"):
        X.plan(bad, fake_resolve, tmp_path)
    twins = S.parse_suite({"name": "d", "base": BASE_CONFIG, "seeds": 1, "cells": [
        {"name": "x", "set": {"grpo.lr": 1e-4}}, {"name": "y"}]})  # BASE_CONFIG already has grpo.lr 1e-4
    with pytest.raises(ValueError, match="'x' and 'y' resolve to the same config"):
        X.plan(twins, fake_resolve, tmp_path)


def test_parallel_jobs_in_spawned_processes(tmp_path):
    suite = S.parse_suite({"name": "p", "base": BASE_CONFIG, "seeds": 2, "cells": [{"name": "a"}]})
    outcomes = X.execute(suite, X.plan(suite, fake_resolve, tmp_path), fake_train, jobs=2)
    assert [o.error for o in outcomes] == [None, None]
    assert all(R.run_status(o.path) is R.RunStatus.FINISHED for o in outcomes)


def test_a_new_config_default_does_not_orphan_existing_runs(tmp_path):
    """A field added to the config (new default) changes the hash; the suite still finds the run by re-resolving."""
    suite = S.parse_suite({"name": "n", "base": BASE_CONFIG, "seeds": 1, "cells": [{"name": "a"}]})
    (p,) = X.plan(suite, fake_resolve, tmp_path)
    X.execute(suite, [p], fake_train)

    def newer_resolve(base, overrides):  # the trainer grew grpo.new_knob with a default
        cfg = fake_resolve(base, overrides)
        cfg["grpo"].setdefault("new_knob", 1)
        return cfg

    (again,) = X.plan(suite, newer_resolve, tmp_path)
    assert again.run_id != p.run_id and again.path == p.path and again.action is X.Action.SKIP
