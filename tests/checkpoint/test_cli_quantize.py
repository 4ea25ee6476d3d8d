"""`quarl quantize`, and `quarl eval` / `quarl diagnose` on its output (testbed model; a few seconds each).

Run: pytest tests/checkpoint/test_cli_quantize.py
"""

import json

import pytest

from quarl.cli import main


@pytest.fixture(scope="module")
def nvfp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "testbed-nvfp4"
    assert main(["quantize", "testbed:tiny", "--scheme", "NVFP4", "--out", str(out), "--calibration-n", "4",
                 "--no-progress"]) == 0
    return out


def test_quantize_writes_a_compressed_tensors_directory(nvfp4, capsys):
    cfg = json.loads((nvfp4 / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "nvfp4-pack-quantized"
    assert cfg["model_type"] == "llama" and (nvfp4 / "tokenizer.json").is_file()
    assert main(["quantize", "testbed:tiny", "--scheme", "NVFP4", "--out", str(nvfp4)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_eval_reports_the_checkpoint_scheme(nvfp4, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(nvfp4), "--n", "2", "--max-new-tokens", "32", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "checkpoint: compressed-tensors NVFP4 (nvfp4-pack-quantized, inputs nvfp4 (static))" in text
    assert "packed-module forwards (NVFP4)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["checkpoint"]["scheme"] == "NVFP4"
    assert main(["eval", "--model", str(nvfp4), "--scheme", "MXFP4", "--n", "2", "--out", str(tmp_path / "e2")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_diagnose_uses_the_checkpoint_input_quantization(nvfp4, tmp_path, capsys):
    report = tmp_path / "d.json"
    assert main(["diagnose", "--model", str(nvfp4), "--no-grad-check", "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint: compressed-tensors NVFP4" in text and "nvfp4 on input" in text
    assert json.loads(report.read_text())["spec"]["injection_point"] == "input"


def test_diagnose_weight_only_checkpoint_needs_an_injection(tmp_path, capsys):
    out = tmp_path / "a16"
    assert main(["quantize", "testbed:tiny", "--scheme", "MXFP4A16", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--model", str(out), "--no-grad-check"]) == 2
    assert "weight-only MXFP4A16 checkpoint" in capsys.readouterr().err
    assert main(["diagnose", "--model", str(out), "--scheme", "NVFP4", "--no-grad-check"]) == 0
    assert "checkpoint: compressed-tensors MXFP4A16" in capsys.readouterr().out
