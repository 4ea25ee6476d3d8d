"""quarl.diagnose: report contents, the no-STE detection, never-fired detection, sensitivity, JSON and plot.

Run: python -m pytest tests/diagnose/test_diagnose_run.py -q
"""

import json

import pytest
import torch

from quarl.diagnose import DEFAULT_PROMPTS, DEFAULT_REFERENCES, diagnose, plot_damage
from quarl.inject import InjectionSpec


PROMPTS = ["Mia has 3 packs of 12 pens.", "Tom buys 4 cakes at $2."]  # char-level: one token per character
REFS = ["3 * 12 = 36\n#### 36", "4 * 2 = 8\n#### 8"]  # + the " " before each reference (no BOS is added)


def test_default_prompts_are_gsm8k_style():
    assert len(DEFAULT_PROMPTS) == len(DEFAULT_REFERENCES) >= 5
    assert all(p.endswith('output the final answer after "####".') for p in DEFAULT_PROMPTS)
    assert all("\n#### " in r for r in DEFAULT_REFERENCES)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_w4a4_report_is_complete_and_model_restored(model, tokenizer):
    before, ids = _state(model), torch.randint(0, 128, (2, 10))
    ref = model(ids).logits
    report = diagnose(model, InjectionSpec(scheme="MXFP4"), tokenizer=tokenizer, prompts=PROMPTS, references=REFS)
    assert report.ok, report.errors
    assert report.n_sequences == 2 and report.n_tokens == sum(len(p) + 1 + len(r) for p, r in zip(PROMPTS, REFS))
    assert report.kl > 0 and 0 <= report.top1 <= 1
    assert report.nll_clean is not None and report.nll_injected != report.nll_clean
    assert len(report.layers) == 14
    row = report.layers[0]
    assert row.fires == {"rollout": 1, "training": 1}  # diagnosis forward + gradient-flow pass
    assert 0 < row.weight["rel_err"] < 0.3 and row.input["sqnr_db"] > 10 and 0 <= row.input["zero_frac"] < 1
    assert row.input["amax"] > 0 and row.input["outlier"] >= 1
    assert report.grad_phase == "training" and report.grad_checked > 14 and not report.grad_issues
    assert report.fires_by_phase == {"rollout": 14, "training": 14}
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in before.items()) and torch.equal(model(ids).logits, ref)
    assert all(p.grad is None for p in model.parameters())  # gradients restored (there were none)


def test_no_ste_is_detected_as_an_error(model):
    """failure mode 1 in docs/failure-modes.md, caught before any GPU hour: every projection input loses its
    gradient."""
    ids = torch.randint(0, 128, (2, 16))
    report = diagnose(model, InjectionSpec(scheme="W4A4", use_ste=False), input_ids=ids)
    assert not report.ok and any("gradient flow" in e for e in report.errors)
    inputs = {g.name for g in report.grad_issues if g.kind == "input"}
    assert "model.layers.0.self_attn.q_proj" in inputs and "model.layers.1.mlp.down_proj" in inputs
    good = diagnose(model, InjectionSpec(scheme="W4A4"), input_ids=ids)
    assert good.ok and not good.grad_issues


def test_never_fired_injection_is_an_error(model):
    """An injection declared on a module the forward never calls (here: a layer outside the call graph)."""
    model.model.unused_proj = torch.nn.Linear(64, 64)
    report = diagnose(model, InjectionSpec(scheme="NVFP4A16"), input_ids=torch.randint(0, 128, (1, 8)),
                      check_gradients=False)
    assert report.never_fired == ["model.unused_proj"]
    assert any("never fired" in e and "model.unused_proj" in e for e in report.errors)


def test_rollout_only_spec_runs_in_rollout_and_notes_gradient_phase(model):
    report = diagnose(model, InjectionSpec(scheme="NVFP4", apply_during="rollout"),
                      input_ids=torch.randint(0, 128, (1, 8)))
    assert report.phase == "rollout" and report.grad_phase == "rollout" and report.notes


@pytest.mark.parametrize("by,units", [("layer", 14), ("block", 2)])
def test_sensitivity_scan_ranks_units(model, by, units):
    ids = torch.randint(0, 128, (1, 8))
    report = diagnose(model, InjectionSpec(scheme="MXFP4"), input_ids=ids, check_gradients=False, sensitivity=by)
    kls = [r.kl for r in report.sensitivity]
    assert len(kls) == units and kls == sorted(kls, reverse=True) and kls[0] > 0
    if by == "block":
        assert {r.unit for r in report.sensitivity} == {"block 0", "block 1"}


def test_single_layer_sensitivity_equals_a_direct_single_layer_diagnosis(model):
    ids = torch.randint(0, 128, (1, 8))
    report = diagnose(model, InjectionSpec(scheme="MXFP4"), input_ids=ids, check_gradients=False, sensitivity="layer")
    top = report.sensitivity[0]
    alone = diagnose(model, InjectionSpec(scheme="MXFP4", targets=(f"^{top.unit}$",)), input_ids=ids,
                     check_gradients=False)
    assert alone.kl == top.kl and alone.top1 == top.top1


def test_noise_sensitivity_uses_measured_error_or_given_scale(model):
    ids = torch.randint(0, 128, (1, 8))
    report = diagnose(model, InjectionSpec(scheme="MXFP4A16"), input_ids=ids, check_gradients=False,
                      sensitivity="block", sensitivity_noise=True)
    for row in report.sensitivity:  # sigma = mean measured weight rel_err of the block's 7 projections
        block = [r.weight["rel_err"] for r in report.layers if f"layers.{row.unit.split()[-1]}." in r.module]
        assert len(block) == 7 and row.noise_scale == pytest.approx(sum(block) / 7, rel=1e-12)
    fixed = diagnose(model, InjectionSpec(scheme="MXFP4A16"), input_ids=ids, check_gradients=False,
                     sensitivity="block", sensitivity_noise=True, noise_scale=0.01)
    assert all(r.noise_scale == 0.01 for r in fixed.sensitivity) and fixed.sensitivity_mode == "block / noise"


def test_json_and_table_and_plot(model, tmp_path):
    report = diagnose(model, InjectionSpec(scheme="NVFP4"), input_ids=torch.randint(0, 128, (2, 8)),
                      sensitivity="block")
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert data["spec"]["error_type"] == "nvfp4" and len(data["layers"]) == 14 and len(data["sensitivity"]) == 2
    text = report.table()
    assert "model.layers.1.mlp.down_proj" in text and "KL" in text and "gradient flow" in text
    png = plot_damage(report, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report.sensitivity = []
    assert plot_damage(report, tmp_path / "e.png").stat().st_size > 1000


def test_needs_tokens_or_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        diagnose(model, InjectionSpec(scheme="MXFP4"))
