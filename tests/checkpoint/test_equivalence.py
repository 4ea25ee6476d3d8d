"""Pre-quantized checkpoint == on-the-fly injection of the same scheme, on the shipped testbed model.

With one global scale per module and dynamic input scales the two paths compute the same numbers, so logits and a
greedy step-0 evaluation match exactly; llm-compressor's fused NVFP4 global scales and static input scales are the
documented differences, checked for what they change and nothing else.

Run: pytest tests/checkpoint/test_equivalence.py
"""

import pytest
import torch

from quarl.checkpoint import CompressedLinear, export_checkpoint, get_scheme, load_checkpoint
from quarl.checkpoint.export import fused_weight_amax, quantizable_modules
from quarl.formats import fake_quantize
from quarl.inject import attach

# W4A16 (INT4 group 128) cannot store the testbed: its hidden size 96 is not a multiple of 128 (test_codec.py)
SCHEMES = ("NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "FP8")




@pytest.fixture(scope="module")
def exported(testbed, calibration, tmp_path_factory):
    model, tok = testbed
    cache = {}

    def make(name, fuse=False):
        if (name, fuse) not in cache:
            out = tmp_path_factory.mktemp(f"tb-{name}-{fuse}") / "ckpt"
            export_checkpoint(model, tok, get_scheme(name), out, calibration=calibration, fuse_global_scales=fuse,
                              progress=False)
            cache[name, fuse] = out
        return cache[name, fuse]

    return make


def _ids(tok):
    return torch.tensor([tok.encode("Sam has 5 pens and gives away 2. How many pens are left? Let's think step by step.")])


def _injected_logits(model, spec, ids):
    with attach(model, spec), torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", SCHEMES)
def test_logits_equal_on_the_fly_injection(name, testbed, exported):
    model, tok = testbed
    ids = _ids(tok)
    ckpt, _, info = load_checkpoint(exported(name), input_mode="dynamic")
    assert info.modules == 42 and all(m.calls == 0 for m in ckpt.modules() if isinstance(m, CompressedLinear))
    with torch.no_grad():
        got = ckpt(ids).logits
    assert torch.equal(got, _injected_logits(model, info.scheme.injection_spec(), ids))  # bit for bit
    assert all(m.calls == 1 for m in ckpt.modules() if isinstance(m, CompressedLinear))


@pytest.mark.parametrize("name", ["NVFP4A16", "NVFP4", "MXFP4"])
def test_step0_eval_equals_on_the_fly_injection(name, testbed, exported):
    from quarl.data.sources import load_source
    from quarl.eval.harness import EvalConfig, GenerationConfig, run_eval

    model, tok = testbed
    problems = load_source("synthetic", n=8, split="test")
    cfg = EvalConfig(generation=GenerationConfig(max_new_tokens=96, batch_size=8))
    ckpt, ckpt_tok, info = load_checkpoint(exported(name), input_mode="dynamic")
    a = run_eval(ckpt, ckpt_tok, problems, cfg, progress=False)
    b = run_eval(model, tok, problems, cfg, spec=info.scheme.injection_spec(), progress=False)
    assert [s.completion for s in a.samples] == [s.completion for s in b.samples]
    assert [s.correct for s in a.samples] == [s.correct for s in b.samples]


def test_fused_global_scales_change_only_the_fused_modules(testbed, exported):
    """llm-compressor's fusion: q/k/v and gate/up weights equal fake_quantize with their group's joint amax; o_proj
    and down_proj are untouched, so they equal on-the-fly injection exactly."""
    model, _ = testbed
    ckpt, _, info = load_checkpoint(exported("NVFP4A16", fuse=True))
    joint, groups = fused_weight_amax(quantizable_modules(model))
    assert groups == 12  # 6 blocks x (q/k/v, gate/up)
    fmt = info.scheme.weight_fmt
    for fqn, linear in quantizable_modules(model):
        packed = ckpt.get_submodule(fqn)
        if fqn in joint:
            assert torch.equal(packed.dequantized_weight(), fake_quantize(linear.weight, fmt, global_amax=joint[fqn]))
        else:
            assert fqn.endswith(("o_proj", "down_proj"))
            assert torch.equal(packed.dequantized_weight(), fake_quantize(linear.weight, fmt))


@pytest.mark.parametrize("name", ["NVFP4", "FP8"])
def test_static_input_scales_reproduce_the_calibrated_amax(name, testbed, exported, calibration):
    """input_mode='static' quantizes inputs with the scale calibrated at export: for NVFP4 that is fake_quantize with
    the calibrated amax as a static per-tensor amax, bit for bit (the stored encode factor is reproduced exactly)."""
    from quarl.checkpoint.export import calibrate_input_amax

    model, tok = testbed
    amax = calibrate_input_amax(model, quantizable_modules(model), calibration)
    ckpt, _, info = load_checkpoint(exported(name))
    x = torch.randn(3, 96) * 2
    for fqn in ("model.layers.0.self_attn.q_proj", "model.layers.5.mlp.up_proj"):
        module = ckpt.get_submodule(fqn)
        if name == "NVFP4":
            want = fake_quantize(x, info.scheme.input_fmt, global_amax=amax[fqn])
        else:
            scale = amax[fqn] / 448.0
            want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
        assert torch.equal(module.quantize_input(x), want)
