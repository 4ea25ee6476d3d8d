"""NVFP4 non-finite inputs per profile (``nonfinite="reference"``, the default): each profile reproduces its reference
on tensors holding NaN / +-Inf, run against the references themselves -- compressed-tensors 0.20 and torchao 0.18 --
and the transcription of TransformerEngine's PyTorch reference (the helpers of the ``test_xcheck_*`` modules).
``nonfinite="block"`` keeps quarl's block-local policy (tests/formats/test_policies.py).

Comparison: NaN positions equal and every other element equal (``==``; -0.0 vs +0.0 is the documented sign-of-zero
difference, docs/formats.md difference 10), so +-Inf positions and signs are compared too.

Run: python -m pytest tests/formats/test_policies_nonfinite.py -q
"""

import logging

import pytest
import torch
from _adversarial import FINITE, nonfinite
from compressed_tensors.quantization.utils import generate_gparam
from test_xcheck_compressed_tensors import _ct_nvfp4
from test_xcheck_torchao import _ao_nvfp4
from _vllm_reference import ref_nvfp4_quant_dequant
from test_xcheck_transformer_engine import _te_nvfp4

from quarl.formats import NonFinite, dequantize, fake_quantize, get_format, quantize

logging.getLogger("compressed_tensors").setLevel(logging.ERROR)
BAD = [float("nan"), float("inf"), float("-inf")]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return a.shape == b.shape and torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _reference(profile: str, x: torch.Tensor) -> torch.Tensor:
    if profile == "compressed_tensors":
        return _ct_nvfp4(x)["fq"]
    if profile == "torchao":
        return _ao_nvfp4(x)["deq"]
    if profile == "vllm":  # vLLM serves the global scale compressed-tensors computed (its input_global_scale)
        return ref_nvfp4_quant_dequant(x.clone(), _ct_nvfp4(x)["gs"].to(torch.float32))
    return _te_nvfp4(x)["deq"]


def _inputs() -> list[torch.Tensor]:
    out = []
    for bad in BAD:
        x = FINITE["normal"](rows=4, cols=64, seed=0)
        x[1, 5] = bad  # one non-finite element
        out.append(x)
    for family in ("normal", "outliers", "nv_ties", "zero_blocks"):
        out.append(nonfinite(FINITE[family](rows=16, cols=64, seed=2), seed=3, frac=0.01))  # a mix of all three
    both = FINITE["uniform"](rows=4, cols=32, seed=1)
    both[0, 0], both[3, 31] = float("nan"), float("inf")
    out.append(both)
    return out


@pytest.mark.parametrize("profile", ["compressed_tensors", "torchao", "transformer_engine", "vllm"])
def test_reference_policy_reproduces_each_reference(profile):
    fmt = get_format("nvfp4", profile=profile)
    assert fmt.nonfinite is NonFinite.REFERENCE  # the default
    for x in _inputs():
        ref = _reference(profile, x)
        y = fake_quantize(x, fmt)
        assert _same(y, ref), (profile, x.shape)
        assert _same(dequantize(quantize(x, fmt)), y)


@pytest.mark.parametrize("bad", BAD)
def test_reference_outcomes_as_documented(bad):
    # nvfp4.py's table: which elements each reference turns into NaN / Inf
    x = FINITE["normal"](rows=4, cols=64, seed=0)
    x[1, 5] = bad
    ct = fake_quantize(x, "nvfp4", profile="compressed_tensors")
    ao = fake_quantize(x, "nvfp4", profile="torchao")
    te = fake_quantize(x, "nvfp4", profile="transformer_engine")
    assert bool(torch.isnan(ao).all())
    if bad != bad:  # NaN
        assert bool(torch.isnan(ct[1, :16]).all()) and int(torch.isnan(ct).sum()) == 16  # gs = 1, one NaN block
        gs1 = fake_quantize(torch.where(torch.isnan(x), 0.0, x), "nvfp4", global_amax=torch.tensor([2688.0]))
        assert torch.equal(ct[0], gs1[0])  # every other block scaled as if T = 2688 (gs = 1)
        assert bool(torch.isnan(te).all())
    else:
        assert bool(torch.isnan(ct).all())
        assert bool((torch.isnan(te) | torch.isinf(te)).all()) and bool(torch.isinf(te).any())


@pytest.mark.parametrize("bad", BAD)
def test_ct_static_global_scale_with_nonfinite(bad):
    # a calibrated (static) global scale: the block formulas meet the NaN / Inf itself (an Inf saturates)
    x = FINITE["normal"](rows=4, cols=64, seed=4)
    t = x.abs().amax()
    x[2, 40] = bad
    scheme_ref = _ct_static(x, t)
    y = fake_quantize(x, "nvfp4", global_amax=t.reshape(1))
    assert _same(y, scheme_ref)
    if bad == bad:
        assert not bool(torch.isnan(y).any()) and torch.equal(y[2, 40].abs(), y.abs().amax())


def _ct_static(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme("NVFP4", ["Linear"]).weights
    gs = generate_gparam(-t, t)
    scale, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=gs)
    return ct_fake_quantize(x, scale, zp, args, global_scale=gs)


def test_block_policy_is_explicit_and_block_local():
    x = FINITE["normal"](rows=4, cols=64, seed=0)
    clean = fake_quantize(x, "nvfp4", nonfinite="block")
    x[1, 5] = float("inf")
    for profile in ("compressed_tensors", "torchao", "transformer_engine", "vllm"):
        y = fake_quantize(x, "nvfp4", profile=profile, nonfinite="block")
        assert bool(torch.isnan(y[1, :16]).all()) and int(torch.isnan(y).sum()) == 16, profile
    y = fake_quantize(x, "nvfp4", nonfinite="block")
    assert torch.equal(y[0], clean[0]) and torch.equal(y[1, 16:], clean[1, 16:])
    with pytest.raises(ValueError, match="nonfinite"):
        get_format("nvfp4", nonfinite="blockwise")
    with pytest.raises(ValueError, match="unknown option"):
        get_format("mxfp4", nonfinite="block")  # MX is block-local by definition (OCP NaN scale byte)
