"""`quarl demo` (the training demo) end to end with a tiny GRPO budget: baseline, run, table, curves (slow, ~20 s).

Run: OMP_NUM_THREADS=1 python -m pytest tests/runs/test_cli_demo_train.py -m slow -q
"""

import json

import pytest

from quarl.cli import main
from quarl.runs import registry as R

TINY = ["--set", "grpo.prompts_per_step=2", "--set", "grpo.generations=2", "--set", "grpo.max_new_tokens=32",
        "--set", "run.threads=1"]


@pytest.mark.slow
def test_training_demo_reports_the_paired_recovery(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "2", "--n", "8", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    (run,) = R.list_runs(out)
    assert run.status is R.RunStatus.FINISHED and run.step == 2 and run.name == "demo"
    cfg = (run.path / "config.yaml").read_text()
    assert "scheme: MXFP4" in cfg and "use_ste: true" in cfg and "enabled: true" in cfg  # W4A4, STE, AQN
    table = (out / "table.md").read_text()
    assert "| fp32 | shipped model" in table and "| demo | GRPO + LoRA, 2 steps" in table
    assert "| mxfp4 | both | both | on | qerl 0.01→0.0001 |" in table
    assert table.strip() in text  # the printed table is the written one
    assert len((out / "fp32_eval.jsonl").read_text().splitlines()) == 8
    rows = [json.loads(x) for x in (run.path / "eval" / "step-2.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"run directory: {run.path}" in text and "quarl suite suites/e13.yaml" in text
    assert ("measured recovery" in text) != ("no recovery resolved" in text)


def test_demo_rejects_a_bad_override(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--set", "grpo.lrr=1"]) == 2
    assert "'lr'" in capsys.readouterr().err and not (tmp_path / "d").exists()
