"""`quarl diagnose` end to end through the CLI, with `quarl.models.load_model` replaced by a tiny in-test model.

Run: python -m pytest tests/diagnose/test_diagnose_cli.py -q
"""

import json

import pytest

import quarl.models
from quarl.cli import main


@pytest.fixture
def fake_loader(monkeypatch, model, tokenizer):
    calls = []

    def load_model(spec, *, dtype=None, device="cpu"):
        calls.append((spec, dtype, device))
        return model, tokenizer

    monkeypatch.setattr(quarl.models, "load_model", load_model, raising=False)
    return calls


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "reference": "2"}\n{"prompt": "2 + 3 =", "reference": "5"}\n')
    return path


def test_cli_scheme_json_plot_sensitivity(fake_loader, prompt_file, tmp_path, capsys):
    rc = main(["diagnose", "--model", "testbed:tiny", "--scheme", "MXFP4", "--json", str(tmp_path / "o.json"),
               "--plot", str(tmp_path / "o.png"), "--sensitivity", "--prompts", str(prompt_file)])
    out = capsys.readouterr().out
    assert rc == 0 and fake_loader == [("testbed:tiny", None, "cpu")]
    assert "KL" in out and "reference-answer NLL" in out and "sensitivity (layer / quantization)" in out
    data = json.loads((tmp_path / "o.json").read_text())
    assert data["spec"]["error_type"] == "mxfp4" and len(data["sensitivity"]) == 14
    assert (tmp_path / "o.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_builtin_prompts_with_nll(fake_loader, capsys):
    rc = main(["diagnose", "--model", "x", "--scheme", "NVFP4A16", "--nll", "--no-grad-check", "--max-length", "400"])
    out = capsys.readouterr().out
    assert rc == 0 and "6 sequences" in out and "reference-answer NLL" in out


def test_cli_no_ste_exits_nonzero(fake_loader, prompt_file, capsys):
    rc = main(["diagnose", "--model", "x", "--scheme", "W4A4", "--no-ste", "--prompts", str(prompt_file)])
    assert rc == 1 and "ERROR: gradient flow" in capsys.readouterr().out


def test_cli_spec_yaml_and_prompt_file(fake_loader, prompt_file, tmp_path, capsys):
    from quarl.inject import InjectionSpec

    spec = tmp_path / "s.yaml"
    InjectionSpec(error_type="relative_gaussian", error_scale=0.01, injection_point="input").to_yaml(spec)
    rc = main(["diagnose", "--model", "x", "--spec", str(spec), "--prompts", str(prompt_file), "--no-grad-check",
               "--sensitivity", "block", "--noise", "--noise-scale", "0.05"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 sequences" in out and "relative_gaussian on input" in out and "block / noise" in out


def test_cli_rejects_conflicting_scheme(fake_loader, capsys):
    assert main(["diagnose", "--model", "x", "--scheme", "NVFP4", "--error-type", "mxfp4"]) == 2
    assert "scheme 'NVFP4' means error_type='nvfp4'" in capsys.readouterr().err
    assert fake_loader == []  # the spec is validated before any model is loaded
