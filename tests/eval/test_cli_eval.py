"""`quarl eval` end to end on the shipped sample data, with the model loader swapped for a tiny in-test model.

Run: python -m pytest tests/eval/test_cli_eval.py -q
(`quarl.models.load.load_model("testbed:tiny")` needs the shipped testbed checkpoint; this test replaces the loader
so that it checks the CLI wiring — data loading, config, run_eval, files, printed CIs — on its own.)
"""

import json
import socket
import subprocess
import sys

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
    verl = [line for line in printed.splitlines() if line.startswith("val-core/")]
    assert verl and verl[0].startswith("val-core/openai/gsm8k/acc/mean@1 = ")
    assert all(" [" in line and "95%, n=3)" in line for line in verl)  # a CI on every printed accuracy
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


def _eval(*extra, out):
    return main(["eval", "--data", str(sample_path("jsonl")), "--n", "2", "--max-new-tokens", "2", "--no-progress",
                 "--out", str(out), *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("quarl eval: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_eval_rejects_greedy_k(tiny_loader, tmp_path, capsys):
    assert _eval("--samples", "2", out=tmp_path / "x") == 2
    assert "identical" in _one_line_error(capsys) and tiny_loader == []  # rejected before loading the model


def test_cli_eval_spec_unknown_key_is_one_line(tiny_loader, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("scheme: W4A16\ntargest: [q_proj]\n")
    assert _eval("--spec", str(spec), out=tmp_path / "x") == 2
    assert "did you mean 'targets'" in _one_line_error(capsys) and tiny_loader == []


def test_cli_eval_unknown_data_lists_sources_offline(tiny_loader, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    attempts = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
    rc = main(["eval", "--data", "nope", "--out", str(tmp_path / "x"), "--no-progress"])
    err = _one_line_error(capsys)
    assert rc == 2 and attempts == [] and tiny_loader == []
    assert "'nope'" in err and all(name in err for name in ("synthetic", "gsm_symbolic", "gsm8k", ".jsonl", ".parquet"))


def test_cli_eval_unknown_model_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # quarl.models then looks in the local cache only
    assert _eval("--model", "nosuch", out=tmp_path / "x") == 2
    err = _one_line_error(capsys)
    assert "'nosuch'" in err and "testbed:tiny" in err


def test_cli_eval_used_out_dir_fails_before_the_model(tiny_loader, tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert _eval(out=tmp_path) == 2
    assert "never overwritten" in _one_line_error(capsys) and tiny_loader == []


def test_cli_eval_dtype_choices(tiny_loader, tmp_path):
    with pytest.raises(SystemExit) as exc:
        _eval("--dtype", "fp8", out=tmp_path / "x")
    assert exc.value.code == 2 and tiny_loader == []


def test_cli_eval_import_stays_light():
    code = "import sys, quarl.cli.eval; print(sorted({'quarl.models', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_cli_eval_reports_what_a_precision_plan_kept(tiny_loader, tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("scheme: MXFP4\nrotation: block\nplan: {rules: [{layers: [0], format: none}]}\n")
    out = tmp_path / "run"
    rc = _eval("--spec", str(spec), out=out)
    printed = capsys.readouterr().out
    assert rc == 0 and "precision plan: 7 modules unquantized: model.layers.0.self_attn.q_proj" in printed
    formats = json.loads((out / "summary.json").read_text())["quantization"]["formats"]
    assert formats["model.layers.1.mlp.down_proj"] == "mxfp4"
    assert formats["model.layers.0.mlp.down_proj"].startswith("none (plan rule 0")
