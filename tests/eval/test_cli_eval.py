"""`quarl eval` end to end on the shipped sample data, with the model loader swapped for a tiny in-test model.

Run: python -m pytest tests/eval/test_cli_eval.py -q
(`quarl.models.load.load_model("testbed:tiny")` needs the shipped testbed checkpoint; this test replaces the loader
so that it checks the CLI wiring — data loading, config, run_eval, files, printed CIs — on its own.)
"""

import json

import pytest
from _tiny_lm import tiny_model, tiny_tokenizer

import quarl.cli.eval as cli_eval
from quarl.cli import main
from quarl.data.gsm8k import sample_path


@pytest.fixture
def tiny_loader(monkeypatch):
    calls = []

    def load(spec, dtype=None, device="cpu"):
        calls.append((spec, dtype, device))
        tok = tiny_tokenizer()
        return tiny_model(len(tok)), tok

    monkeypatch.setattr(cli_eval, "load_model", load)
    return calls


def test_cli_eval_writes_results(tiny_loader, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["eval", "--model", "fake", "--data", str(sample_path("parquet")), "--n", "3", "--batch-size", "2",
               "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0 and tiny_loader == [("fake", None, "cpu")]
    printed = capsys.readouterr().out
    assert "val-core/openai/gsm8k/acc/mean@1 = " in printed and "wilson 95%" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n"] == 3 and summary["config"]["spec"] is None and summary["quantization"] is None
    assert summary["config"]["eval"]["generation"]["max_new_tokens"] == 4
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3


def test_cli_eval_sampling_k(tiny_loader, tmp_path, capsys):
    out = tmp_path / "k"
    main(["eval", "--data", str(sample_path("jsonl")), "--n", "2", "--samples", "3", "--temperature", "1.0",
          "--max-new-tokens", "3", "--out", str(out), "--no-progress"])
    assert "maj@3" in capsys.readouterr().out
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6


def test_cli_eval_rejects_greedy_k(tiny_loader, tmp_path):
    with pytest.raises(ValueError, match="identical"):
        main(["eval", "--data", str(sample_path("jsonl")), "--samples", "2", "--out", str(tmp_path / "x")])
