"""`calibrate_spec` / `quarl calibrate`: static activation scales for on-the-fly injection, as `quarl quantize` stores.

Run: pytest tests/checkpoint/test_calibrate.py -q

The same calibration batches give the same amaxes as the checkpoint export, so a checkpoint served with its static
input scales (``input_mode="static"``, what vLLM runs) and ``attach(model, calibrate_spec(...))`` compute the same
logits bit for bit (NVFP4 and FP8, one weight global scale per module); a dynamic spec differs from both.
"""

from __future__ import annotations

import json

import pytest
import torch

from quarl.checkpoint import export_checkpoint, get_scheme, load_checkpoint
from quarl.checkpoint.calibrate import calibrate_spec
from quarl.checkpoint.export import calibrate_input_amax, quantizable_modules
from quarl.inject import InjectionSpec, attach




def _ids(tok):
    return torch.tensor([tok.encode("Sam has 5 pens and gives away 2. How many pens are left? Let's think.")])


def _logits(model, spec, ids):
    with attach(model, spec), torch.no_grad():
        return model(ids).logits


def test_calibrated_amax_equals_export_calibration(testbed, calibration):
    model, _ = testbed
    spec = calibrate_spec(model, InjectionSpec(scheme="NVFP4"), calibration)
    want = calibrate_input_amax(model, quantizable_modules(model), calibration)
    assert spec.input_scale == "static" and set(spec.input_amax) == set(want)
    assert all(torch.equal(torch.tensor([spec.input_amax[k]]), want[k]) for k in want)  # fp32 exact through float
    again = InjectionSpec.from_yaml(spec.to_yaml())
    assert again.input_amax == spec.input_amax  # YAML round trip keeps every fp32 amax exactly


@pytest.mark.parametrize("name", ["NVFP4", "FP8"])
def test_static_checkpoint_equals_calibrated_injection(name, testbed, calibration, tmp_path):
    model, tok = testbed
    out = tmp_path / "ckpt"
    export_checkpoint(model, tok, get_scheme(name), out, calibration=calibration, fuse_global_scales=False,
                      progress=False)
    ckpt, _, info = load_checkpoint(out, input_mode="static")
    ids = _ids(tok)
    with torch.no_grad():
        served = ckpt(ids).logits
    spec = calibrate_spec(model, info.scheme.injection_spec(), calibration)
    assert torch.equal(_logits(model, spec, ids), served)  # bit for bit
    assert not torch.equal(_logits(model, info.scheme.injection_spec(), ids), served)  # dynamic is not static


def test_calibrate_refuses_formats_without_a_tensor_scale(testbed, calibration):
    model, _ = testbed
    with pytest.raises(ValueError, match="has none"):
        calibrate_spec(model, InjectionSpec(scheme="MXFP4"), calibration)
    with pytest.raises(ValueError, match="does not inject it"):
        calibrate_spec(model, InjectionSpec(scheme="NVFP4A16"), calibration)


def test_calibrate_cli_writes_a_spec_that_attaches(tmp_path, capsys):
    from quarl.cli import main

    out = tmp_path / "calibrated.yaml"
    rc = main(["calibrate", "testbed:tiny", "--scheme", "NVFP4", "--calibration-n", "4", "--calibration-batch", "2",
               "--out", str(out)])
    assert rc == 0
    spec = InjectionSpec.from_yaml(out)
    assert spec.input_scale == "static" and len(spec.input_amax) == 42
    assert out.read_text().startswith("# quarl calibrate testbed:tiny")
    assert "42 modules" in capsys.readouterr().out
    rc = main(["calibrate", "testbed:tiny", "--scheme", "MXFP4", "--out", str(tmp_path / "x.yaml")])
    assert rc == 2
    report = tmp_path / "diag.json"
    assert main(["diagnose", "--model", "testbed:tiny", "--spec", str(out), "--no-grad-check", "--json",
                 str(report)]) == 0
    data = json.loads(report.read_text())
    modes = {row["module"]: row["input_scale"] for row in data["layers"]}
    assert modes["model.layers.0.self_attn.q_proj"] == \
        f"static (calibrated amax {spec.input_amax['model.layers.0.self_attn.q_proj']:.6g})"
    assert "activation scales: static (calibrated amax" in capsys.readouterr().out
