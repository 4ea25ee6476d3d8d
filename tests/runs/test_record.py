"""Packed evidence records: round trip against the run directory, strict reading, planning and tables from records.

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_record.py -q
"""

import doctest
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from _fabricate import BASE_CONFIG, fake_resolve, fake_train, make_run, write_run

import quarl.cli.suite as suite_cli
from quarl.cli import main
from quarl.runs import record as K
from quarl.runs import registry as R
from quarl.runs import runner as X
from quarl.runs import suite as S
from quarl.runs.results import summarize_record, summarize_run
from quarl.runs.stats import paired_difference
from quarl.runs.table import Group, run_groups

SUITES = Path(__file__).resolve().parents[2] / "suites"


def _run(tmp_path, **kw):
    kw.setdefault("val", {0: 0.30, 4: 0.35, 8: 0.40})
    return make_run(tmp_path / "runs", name=kw.pop("name", "a"), n_problems=40, **kw)


def test_doctests():
    assert doctest.testmod(K).failed == 0


def test_bits_round_trip_and_reject_wrong_lengths():
    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 1000):
        bits = rng.random(n) < 0.5
        assert (K.decode_bits(K.encode_bits(bits), n) == bits).all()
    with pytest.raises(ValueError, match="has 3 bytes, this one 2"):
        K.decode_bits(K.encode_bits([True] * 9), 20)
    with pytest.raises(ValueError, match="beyond its 3 problems"):
        K.decode_bits(K.encode_bits([False, False, False, True]), 3)
    with pytest.raises(ValueError, match="not a base64"):
        K.decode_bits("@@@", 3)


def test_pack_round_trip_same_accuracies_and_paired_intervals(tmp_path):
    run = _run(tmp_path)
    dest, written = K.pack_run(run, tmp_path / "evidence", "a-x-s0")
    assert written and sorted(p.name for p in dest.iterdir()) == ["config.yaml", "record.jsonl"]
    assert (dest / "config.yaml").read_text() == (run / "config.yaml").read_text()
    full, packed = summarize_run(run), summarize_record(dest)
    assert (packed.first_step, packed.final_step) == (full.first_step, full.final_step) == (0, 8)
    assert packed.config == full.config and packed.config_hash == full.config_hash
    assert packed.info.status is R.RunStatus.FINISHED and packed.info.seed == 0 and packed.info.name == "a"
    for scorer in ("strict", "flexible"):
        for which in ("step0", "final"):
            assert packed.acc(scorer, which) == full.acc(scorer, which)
        for step in (0, 4, 8):  # the ids p0..p39 sort as p0, p1, p10, ...: the bitset follows that order
            assert sum(packed.eval_correct(step, scorer).values()) == sum(full.eval_correct(step, scorer).values())
        a = paired_difference(full.eval_correct(0, scorer), full.eval_correct(8, scorer))
        b = paired_difference(packed.eval_correct(0, scorer), packed.eval_correct(8, scorer))
        assert a == b
        assert Group("a", (full,)).delta(scorer) == Group("a", (packed,)).delta(scorer)
    # the documented layout: bit i is the i-th id in sorted order; problems is the sha256 of the sorted ids
    rows = [json.loads(line) for line in (run / "eval" / "step-8.jsonl").read_text().splitlines()]
    ids = sorted(r["id"] for r in rows)
    by_id = {r["id"]: r["correct_strict"] for r in rows}
    final = K.read_record(dest).eval_at(8)
    assert final.correct["strict"].tolist() == [by_id[i] for i in ids] and ids[:3] == ["p0", "p1", "p10"]
    assert final.problems == K.problem_set_hash([r["id"] for r in rows])
    # training metrics: the kept keys at every step, 4 significant digits
    rows = {r["step"]: r for r in packed.rows}
    assert rows[3]["reward/mean"] == pytest.approx(0.26) and rows[3]["aqn/sigma"] == float(f"{0.01 / 3:.4g}")
    assert "val/acc_strict" in rows[4] and rows[4]["val/n"] == 40


def test_records_of_two_runs_pair_only_on_the_same_problem_set(tmp_path):
    a = K.read_record(K.pack_run(_run(tmp_path, seed=0), tmp_path / "ev")[0])
    b = K.read_record(K.pack_run(make_run(tmp_path / "other", name="b", n_problems=30), tmp_path / "ev")[0])
    assert a.evals[0].problems != b.evals[0].problems
    with pytest.raises(ValueError, match="share no problem"):
        paired_difference(a.evals[0].as_mapping("strict"), b.evals[-1].as_mapping("strict"))


def test_pack_is_idempotent_and_refuses_to_overwrite_or_pack_unfinished(tmp_path):
    run = _run(tmp_path)
    dest, _ = K.pack_run(run, tmp_path / "ev", "r")
    assert K.pack_run(run, tmp_path / "ev", "r") == (dest, False)
    other = _run(tmp_path, seed=1)
    with pytest.raises(FileExistsError, match="immutable"):
        K.pack_run(other, tmp_path / "ev", "r")
    killed = _run(tmp_path, seed=2, status="killed")
    with pytest.raises(ValueError, match="status killed; only finished"):
        K.pack_run(killed, tmp_path / "ev")
    shutil.rmtree(run / "eval")
    (run / "eval").mkdir()
    with pytest.raises(FileNotFoundError, match="step-0.jsonl"):
        K.pack_run(run, tmp_path / "ev2")
    assert not (tmp_path / "ev2").exists() or not any((tmp_path / "ev2").iterdir())


def _edit_line(dest, index, edit):
    lines = (dest / K.RECORD_FILE).read_text().splitlines()
    obj = json.loads(lines[index])
    edit(obj)
    lines[index] = json.dumps(obj)
    (dest / K.RECORD_FILE).write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("index, edit, match", [
    (1, lambda o: o.update(strct=o["strict"]), "unknown key 'strct'.*did you mean 'strict'"),
    (0, lambda o: o.pop("seed"), "missing key"),
    (0, lambda o: o.update(format=2), "format 2"),
    (1, lambda o: o.update(n=41), "bytes|beyond"),
    (1, lambda o: o["metrics"].update({"val/acc_strict": 0.5}), "logged val/acc_strict"),
    (-1, lambda o: o.update(kind="trian"), "kind is one of"),
    (-1, lambda o: o.update(steps=[[5, 1]]), "increasing"),
    (-1, lambda o: o.update(values=o["values"][:-1]), "steps for"),
])
def test_reading_is_strict(tmp_path, index, edit, match):
    dest, _ = K.pack_run(_run(tmp_path), tmp_path / "ev", "r")
    K.read_record(dest)
    _edit_line(dest, index, edit)
    with pytest.raises(ValueError, match=match):
        K.read_record(dest)


def test_planner_skips_committed_records_even_after_a_new_config_default(tmp_path):
    suite = S.parse_suite({"name": "n", "base": BASE_CONFIG, "seeds": 2, "cells": [{"name": "a"}]})
    runs, evidence = tmp_path / "runs", tmp_path / "evidence" / "n"
    planned = X.plan(suite, fake_resolve, runs, evidence=evidence)
    X.execute(suite, planned[:1], fake_train)  # seed 0 runs; seed 1 never does
    K.pack_run(planned[0].path, evidence, planned[0].run_id)
    shutil.rmtree(runs)  # a fresh checkout: records only

    def newer_resolve(base, overrides):  # the trainer grew a field with a default: every hash changes
        cfg = fake_resolve(base, overrides)
        cfg["grpo"].setdefault("new_knob", 1)
        return cfg

    for resolve in (fake_resolve, newer_resolve):
        s0, s1 = X.plan(suite, resolve, runs, evidence=evidence)
        assert s0.action is X.Action.SKIP and s0.committed and s0.path == evidence / planned[0].run_id
        assert s0.reason == "finished, committed record"
        assert s1.action is X.Action.RUN and not s1.committed and s1.path.parent == runs
    # a record of a different config under the cell's name is not this cell's run
    changed = S.parse_suite({"name": "n", "base": BASE_CONFIG, "seeds": 1,
                             "cells": [{"name": "a", "set": {"grpo.lr": 2.0e-4}}]})
    assert X.plan(changed, fake_resolve, runs, evidence=evidence)[0].action is X.Action.RUN


def test_cell_seeds_override_the_suites(tmp_path):
    suite = S.parse_suite({"name": "c", "base": BASE_CONFIG, "seeds": [0, 1, 2], "cells": [
        {"name": "one", "seeds": [0]}, {"name": "four", "seeds": 4}, {"name": "all"}]})
    assert [(n, s) for n, _, s in suite.runs()] == [("one", 0), *[("four", s) for s in range(4)],
                                                  *[("all", s) for s in range(3)]]
    two = suite.with_seeds(2)
    assert [two.seeds_of(c) for c in two.cells] == [(0, 1), (0, 1), (0, 1)]
    with pytest.raises(ValueError, match=r"cells\[0\].seeds: duplicates"):
        S.parse_suite({"name": "c", "base": BASE_CONFIG, "seeds": 1, "cells": [{"name": "x", "seeds": [1, 1]}]})


def _real_fake_train(config, overrides, out_dir, resume):
    from quarl.rl.config import load_config

    if resume is not None:
        raise AssertionError("nothing should be resumed")
    cfg = load_config(config, overrides).to_dict()
    gain = cfg["grpo"]["lr"] * 1e5 + 0.5 * (cfg["run"]["seed"] - 1)
    return write_run(Path(out_dir), cfg, val={0: 0.5, 8: 0.5 + gain / 100}, n_problems=200)


def test_suite_table_and_plot_from_committed_records_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(suite_cli, "trainer", lambda: _real_fake_train)
    (tmp_path / "suites").mkdir()
    suite = tmp_path / "suites" / "mini.yaml"
    suite.write_text(yaml.safe_dump({"name": "mini", "seeds": 2, "base": {"grpo": {"steps": 8}}, "cells": [
        {"name": "gain", "set": {"injection.scheme": "MXFP4"}, "expect": "final - step0 >= 3"},
        {"name": "one", "set": {"grpo.lr": 2.0e-5}, "seeds": [0]}]}))
    runs = tmp_path / "runs"
    assert main(["suite", str(suite), "--root", str(runs)]) == 0
    assert main(["table", str(suite), "--root", str(runs), "--out", str(tmp_path / "t1")]) == 0
    capsys.readouterr()
    # pack (a directory of runs expands; an unfinished run is listed and skipped), then drop the run directories
    make_run(runs, config=BASE_CONFIG, name="stray", status="killed")
    assert main(["runs", "pack", str(runs), "--into", str(tmp_path / "evidence" / "mini")]) == 0
    out = capsys.readouterr().out
    assert "3 packed, 0 unchanged, 1 skipped, 0 failed" in out and "skip       " in out
    assert main(["runs", "pack", str(runs), "--into", str(tmp_path / "evidence" / "mini")]) == 0
    assert "0 packed, 3 unchanged" in capsys.readouterr().out
    shutil.rmtree(runs)
    # default evidence location: evidence/ beside the suite's directory
    assert main(["suite", str(suite), "--root", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "3 runs: 0 to run, 0 to resume, 3 to skip (3 committed records)" in out
    assert main(["table", str(suite), "--root", str(runs), "--out", str(tmp_path / "t2")]) == 0
    assert (tmp_path / "t2" / "table.md").read_text() == (tmp_path / "t1" / "table.md").read_text()
    assert "| gain |" in (tmp_path / "t2" / "table.md").read_text()
    assert main(["plot", str(suite), "--root", str(runs), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    # ad-hoc tables of records; --evidence elsewhere finds none and plans every run
    assert len(run_groups([tmp_path / "evidence" / "mini"])) == len(run_groups([tmp_path / "evidence"])) == 2
    assert main(["suite", str(suite), "--dry-run", "--root", str(runs), "--evidence", str(tmp_path / "none")]) == 0
    assert "3 runs: 3 to run" in capsys.readouterr().out


def test_shipped_grpo_w4a4_suites_are_their_committed_records(tmp_path, capsys):
    """Every cell of the grpo_w4a4 suites resolves to the config its recorded runs used: nothing left to run."""
    for name, n in (("grpo_w4a4", 20), ("grpo_w4a4_variants", 15)):
        assert main(["suite", str(SUITES / f"{name}.yaml"), "--dry-run", "--root", str(tmp_path)]) == 0
        assert f"{n} runs: 0 to run, 0 to resume, {n} to skip ({n} committed records)" in capsys.readouterr().out
    assert main(["table", str(SUITES / "grpo_w4a4.yaml"), "--root", str(tmp_path), "--out", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ste_long240 |"))
    assert row.endswith("| 4/4 | PASSED |")
