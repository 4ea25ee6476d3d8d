"""Per-sample JSONL + summary JSON, and metrics on planted completions (no model).

Run: python -m pytest tests/eval/test_results.py -q
"""

import json

import pytest

from quarl.data.records import Problem
from quarl.eval.metrics import wilson_interval
from quarl.eval.results import (format_ci, read_samples_jsonl, score_sample, summarize, summary_lines, verl_lines,
                                write_run)

PROBLEMS = [Problem(f"q{i}", f"#### {gt}", gt, "openai/gsm8k", f"test-{i}") for i, gt in enumerate(["72", "5", "10"])]
# Planted completions, 2 per problem: (text, finished)
PLANTED = {
    "test-0": [("so 72\n#### 72", True), ("#### 72.0", True)],  # strict 1/2, numeric 2/2
    "test-1": [("the answer is 5", True), ("I think 5", False)],  # no '####': strict 0, flexible 2/2, format 0
    "test-2": [("#### 11", True), ("#### 10", True)],  # strict 1/2
}


def _samples():
    return [score_sample(p, j, f"prompt {p.id}", text, 7, fin)
            for p in PROBLEMS for j, (text, fin) in enumerate(PLANTED[p.id])]


def test_score_sample_fields():
    s = _samples()
    assert [x.extracted for x in s] == ["72", "72.0", None, None, "11", "10"]
    assert [x.correct_strict for x in s] == [True, False, False, False, False, True]
    assert [x.correct_flexible for x in s] == [True, False, True, True, False, True]  # "72.0" != "72" flexibly too
    assert [x.correct_numeric for x in s] == [True, True, False, False, False, True]
    assert [x.correct for x in s] == [x.correct_strict for x in s]  # the default scorer is strict


def test_summarize_planted():
    m = summarize(_samples())
    block = m["by_source"]["openai/gsm8k"]
    assert block["n_problems"] == 3 and block["samples_per_problem"] == 2
    assert block["strict"]["mean@2"]["value"] == pytest.approx((0.5 + 0 + 0.5) / 3, abs=1e-12)
    assert block["strict"]["best@2"]["value"] == pytest.approx(2 / 3, abs=1e-12)
    # maj@2 votes (ties -> first seen): "72" correct, "" (no answer) wrong, "11" wrong
    assert block["strict"]["maj@2"]["value"] == pytest.approx(1 / 3, abs=1e-12)
    assert block["flexible"]["mean@2"]["value"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-12)
    assert block["numeric"]["mean@2"]["value"] == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-12)
    assert block["format_rate"]["value"] == pytest.approx(4 / 6, abs=1e-12)
    assert block["truncated_rate"]["value"] == pytest.approx(1 / 6, abs=1e-12)
    verl = m["verl"]
    assert verl["val-core/openai/gsm8k/acc/mean@2"] == pytest.approx(1 / 3, abs=1e-12)
    assert {"val-core/openai/gsm8k/acc/best@2/mean", "val-core/openai/gsm8k/acc/maj@2/mean"} <= verl.keys()
    assert "val-aux/openai/gsm8k/reward/mean@2" in verl


def test_summary_lines_print_ci_on_every_accuracy():
    lines = summary_lines(summarize(_samples()))
    acc_lines = [line for line in lines if "%" in line]
    assert len(acc_lines) == 3 * 3 + 2  # (mean, best, maj) x (strict, flexible, numeric) + format + truncated
    assert all("95%" in line and "[" in line for line in acc_lines)
    assert format_ci({"value": 0.5, "ci_low": 0.25, "ci_high": 0.75, "ci": "wilson 95%", "n": 4}) == \
        "50.0% [25.0, 75.0] (wilson 95%, n=4)"


def test_verl_core_metrics_carry_a_ci():
    m = summarize(_samples())
    assert m["verl_ci"].keys() == {name for name in m["verl"] if name.startswith("val-core/")}
    assert "val-core/openai/gsm8k/acc/best@2/mean" in m["verl_ci"]
    for name, ci in m["verl_ci"].items():
        assert ci["value"] == m["verl"][name] and ci["n"] == 3  # the CI is about verl's number, over 3 problems
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
    lines = verl_lines(m)
    assert len(lines) == len(m["verl_ci"]) and all(" [" in line and "95%, n=3)" in line for line in lines)
    assert lines[0].startswith("val-core/openai/gsm8k/acc/mean@2 = 0.3333 [")
    # k = 1: per-problem accuracy is 0/1, so the interval is Wilson's: 2 of 3 correct
    greedy = [score_sample(p, 0, "", text, 1, True) for p, text in zip(PROBLEMS, ["#### 72", "#### 4", "#### 10"])]
    ci = summarize(greedy)["verl_ci"]["val-core/openai/gsm8k/acc/mean@1"]
    assert ci["ci"] == "wilson 95%" and (ci["ci_low"], ci["ci_high"]) == wilson_interval(2, 3)


def test_write_run_round_trip_and_no_overwrite(tmp_path):
    samples = _samples()
    metrics = summarize(samples)
    quant = {"phase": "rollout", "hook_fires": 12}
    summary = write_run(tmp_path / "run", samples, metrics, quant, {"model": "tiny"})
    assert read_samples_jsonl(tmp_path / "run" / "samples.jsonl") == samples
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["config"] == {"model": "tiny"} and on_disk["quantization"] == quant
    assert on_disk["metrics"]["verl"] == pytest.approx(metrics["verl"], abs=0)  # JSON round trip of floats is exact
    for key in ("torch", "transformers", "quarl", "git_sha", "device", "time_utc"):
        assert key in on_disk["environment"]
    assert summary["environment"] == on_disk["environment"]
    row = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "extracted", "correct"} <= row.keys()
    with pytest.raises(FileExistsError):
        write_run(tmp_path / "run", samples, metrics, None, {})
