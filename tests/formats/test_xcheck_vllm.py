"""Cross-check the ``vllm`` NVFP4 profile against a transcription of vLLM's emulation reference, bit for bit.

Run: pytest tests/formats/test_xcheck_vllm.py -q   (``-m slow`` adds the full adversarial family x dtype sweep)

The oracle is `_vllm_reference.py`, a step-by-step transcription of vLLM's CPU ``ref_nvfp4_quant_dequant`` (vLLM
itself needs CUDA wheels and is not installed here), fed the global scale compressed-tensors stores as
``input_global_scale`` (``2688 / amax``). Every comparison is exact: equal values, NaN positions and the sign of
zero (vLLM's ``cast_to_fp4`` returns ``sign(v) * |q|``, so the sign of a zero is part of what is reproduced).

Coverage, as for the other profiles: an exhaustive table (every positive E4M3 block scale x every E2M1 value and
every midpoint between two neighbours), the adversarial families of `_adversarial.py` in fp32 and bf16 with a static
and a dynamic global scale, non-finite inputs under a static scale, hypothesis arrays, and shapes other than 2-D.

The differences from the ``compressed_tensors`` profile (docs/formats-vllm.md) each have a test below that shows a
concrete input where they matter: `test_diff_block_scale_sixth`, `test_diff_element_reciprocal`,
`test_diff_zero_block_scale`, `test_diff_sign_of_zero`; `test_diff_rates` measures how often values differ.
"""

from __future__ import annotations

import pytest
import torch
from _adversarial import FINITE, float_grid, nonfinite, sweep
from _vllm_reference import ct_input_global_scale, ref_nvfp4_quant, ref_nvfp4_quant_dequant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from quarl.formats import dequantize, fake_quantize, get_format, quantize
from quarl.formats.codes import decode

VLLM = get_format("nvfp4", profile="vllm")
CT = get_format("nvfp4")
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype/shape, NaN positions, values and sign of every zero."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def _oracle(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    return ref_nvfp4_quant_dequant(x.clone(), ct_input_global_scale(amax))


def _dynamic_amax(x: torch.Tensor) -> torch.Tensor:
    return x.float().abs().amax().reshape(1)


# --- exhaustive table ---------------------------------------------------------------------------------------------
def _table_blocks(gs_amax: float) -> torch.Tensor:
    """One 16-wide block per (positive E4M3 scale, E2M1 value or midpoint): 6 * eff pins the block amax, the other
    15 elements are that value (or midpoint) and its negatives times ``eff = s8 / gs``."""
    gs = ct_input_global_scale(torch.tensor([gs_amax])).item()
    scales = [s for s in float_grid(4, 3, 448.0) if s > 0]
    points = sorted(set(E2M1) | {(a + b) / 2 for a, b in zip(E2M1, E2M1[1:])})
    rows = []
    for s8 in scales:
        eff = s8 / gs
        for p in points:
            rows.append([6 * eff] + [p * eff, -p * eff] * 7 + [p * eff])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("gs_amax", [4096.0, 2688.0, 1.0, 23936.0])
def test_code_table_matches_reference(gs_amax):
    x = _table_blocks(gs_amax)
    amax = torch.tensor([gs_amax])
    ref_values, ref_scales = ref_nvfp4_quant(x.clone(), ct_input_global_scale(amax))
    q = quantize(x, VLLM, global_amax=amax)
    assert torch.equal(q.scales.float(), ref_scales)
    values = decode(q.codes, VLLM.elem)
    assert _identical(values, ref_values)
    assert _identical(dequantize(q), _oracle(x, amax))
    assert _identical(fake_quantize(x, VLLM, global_amax=amax), dequantize(q))


def test_fp4_ties_round_to_even():
    """amax 2688 gives gs = 1 and a block amax of 6 gives s8 = 1, so the element input is x itself: each E2M1
    midpoint goes to its even neighbour, and -0.0 to +0.0 (vLLM's ``sign(x) * |q|``)."""
    amax = torch.tensor([2688.0])
    assert ct_input_global_scale(amax).item() == 1.0
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    x = torch.cat([torch.tensor([6.0]), mids, -mids, torch.tensor([-0.0])]).reshape(1, 16)
    q = quantize(x, VLLM, global_amax=amax)
    assert q.scales.float().item() == 1.0
    got = decode(q.codes, VLLM.elem)[0]
    assert got[1:8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert got[8:15].tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert torch.signbit(got[8]) and not torch.signbit(got[15])
    assert _identical(fake_quantize(x, VLLM, global_amax=amax), _oracle(x, amax))


# --- adversarial families ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,dtype", sweep(fast=("outliers", "nv_ties", "grid_ties", "tiny", "huge", "zero_blocks",
                                                     "all_zero", "pow2_neighbours"),
                                               fast_bf16=("normal", "outliers", "nv_ties", "zero_blocks")))
def test_adversarial_matches_reference(family, dtype):
    for seed in range(3):
        x = FINITE[family](rows=32, cols=128, seed=seed).to(dtype)
        dyn = _dynamic_amax(x)
        for amax in (dyn, torch.tensor([3.0]), torch.tensor([1e-3])):
            if not amax.item() > 0:
                continue
            y = fake_quantize(x, VLLM, global_amax=amax)
            assert y.dtype == dtype
            assert _identical(y, _oracle(x, amax)), (family, dtype, seed, amax.item())
        if dyn.item() > 0:  # dynamic: the tensor's own amax through compressed-tensors' global-scale formula
            assert _identical(fake_quantize(x, VLLM), _oracle(x, dyn))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_under_static_scale_matches_reference(dtype):
    """A static scale: a NaN makes its block NaN, an Inf saturates to +-6 * eff (vLLM clamps the scale to 448)."""
    for family in ("normal", "outliers", "zero_blocks"):
        x = nonfinite(FINITE[family](rows=32, cols=128, seed=3)).to(dtype)
        for amax in (torch.tensor([3.0]), torch.tensor([1e30])):
            assert _identical(fake_quantize(x, VLLM, global_amax=amax), _oracle(x, amax))


def test_all_zero_tensor_dynamic_gives_zeros():
    x = FINITE["all_zero"](rows=4, cols=32)
    y = fake_quantize(x, VLLM)
    assert torch.equal(y, torch.zeros_like(x)) and not torch.signbit(y).any()  # vLLM: sign(+-0) * 0 = +0


def test_nd_and_partial_shapes():
    """quarl takes any rank (blocks along the last dim); vLLM's reference takes 2-D ``(m, k)``: the same rows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g)
    amax = _dynamic_amax(x)
    assert _identical(fake_quantize(x, VLLM), _oracle(x.reshape(6, 64), amax).reshape(2, 3, 64))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(dtype="float32", shape=(4, 32), elements=st.floats(-2.0**14, 2.0**14, width=32)),
       st.sampled_from([torch.float32, torch.bfloat16]), st.floats(2.0**-10, 2.0**17, width=32))
def test_hypothesis_matches_reference(arr, dtype, static_amax):
    x = torch.from_numpy(arr).to(dtype)
    amax = torch.tensor([static_amax])
    assert _identical(fake_quantize(x, VLLM, global_amax=amax), _oracle(x, amax))
    if _dynamic_amax(x).item() > 0:
        assert _identical(fake_quantize(x, VLLM), _oracle(x, _dynamic_amax(x)))


def test_quantize_dequantize_is_fake_quantize():
    x = FINITE["outliers"](rows=16, cols=64, seed=2).to(torch.bfloat16)
    assert _identical(dequantize(quantize(x, VLLM)), fake_quantize(x, VLLM))
    per_token = get_format(VLLM, tensor_scale="per_token")
    assert _identical(dequantize(quantize(x, per_token)), fake_quantize(x, per_token))


def test_per_token_is_the_reference_per_row():
    x = FINITE["outliers"](rows=8, cols=64, seed=4)
    y = fake_quantize(x, get_format(VLLM, tensor_scale="per_token"))
    for r in range(x.shape[0]):
        row = x[r:r + 1]
        assert _identical(y[r:r + 1], _oracle(row, _dynamic_amax(row)))


# --- differences from the compressed_tensors profile (docs/formats-vllm.md) ----------------------------------------
def test_diff_block_scale_sixth():
    """vLLM scales the block amax by ``fp32(1/6)``, compressed-tensors divides by 6: one ulp apart, which flips an E4M3
    tie. Here ``gs * b / 6`` is exactly the midpoint 0.06640625 of E4M3 0.0625 and 0.0703125 (gs = 2688 / 14336
    ~ 0.1875, b = 2.125): compressed_tensors rounds to even (0.0625), vLLM lands one ulp above it (0.0703125)."""
    x = torch.tensor([[2.125] + [0.0] * 15])
    amax = torch.tensor([14336.0])
    assert quantize(x, CT, global_amax=amax).scales.float().item() == 0.0625
    assert quantize(x, VLLM, global_amax=amax).scales.float().item() == 0.0703125
    # both saturate to code 6; y = 6 * s8 / gs with gs = 0.1875000149 (not exactly 3/16): tolerance 1e-6 relative
    assert fake_quantize(x, CT, global_amax=amax)[0, 0].item() == pytest.approx(2.0, rel=1e-6)
    assert fake_quantize(x, VLLM, global_amax=amax)[0, 0].item() == pytest.approx(2.25, rel=1e-6)
    assert _identical(fake_quantize(x, VLLM, global_amax=amax), _oracle(x, amax))


def test_diff_element_reciprocal():
    """Same block scale, different FP4 code: compressed_tensors computes ``x / (s8 / gs)`` = 3.4999998 (to 3), vLLM
    ``x * r(s8 * r(gs))`` = 3.5 exactly (a tie, to the even 4). gs = 2688 / 23936, s8 = 0.0234375 from b = 1.296875."""
    x = torch.tensor([[0.73046875, 1.296875] + [0.0] * 14])
    amax = torch.tensor([23936.0])
    q_ct, q_vllm = quantize(x, CT, global_amax=amax), quantize(x, VLLM, global_amax=amax)
    assert torch.equal(q_ct.scales.float(), q_vllm.scales.float())
    assert decode(q_ct.codes, CT.elem)[0, 0].item() == 3.0
    assert decode(q_vllm.codes, VLLM.elem)[0, 0].item() == 4.0
    assert _identical(fake_quantize(x, VLLM, global_amax=amax), _oracle(x, amax))


def test_diff_zero_block_scale():
    """A block whose scale rounds to E4M3 zero: vLLM stores 0 and returns zeros (``x * 1e-8``), compressed_tensors
    stores 0.125; the values agree (both round to zero), the stored scale does not."""
    x = torch.tensor([[1e-6, -2e-6] + [0.0] * 14 + [100.0] + [0.0] * 15])  # block 0 tiny next to block 1's amax
    amax = torch.tensor([100.0])
    assert quantize(x, VLLM, global_amax=amax).scales.float()[0, 0].item() == 0.0
    assert quantize(x, CT, global_amax=amax).scales.float()[0, 0].item() == 0.125
    y = fake_quantize(x, VLLM, global_amax=amax)
    assert torch.equal(y[0, :16], fake_quantize(x, CT, global_amax=amax)[0, :16])  # -0.0 == 0.0
    assert _identical(y, _oracle(x, amax))


def test_diff_sign_of_zero():
    """vLLM's ``cast_to_fp4`` multiplies by ``sign(v)``: an input -0.0 gives +0.0 (compressed_tensors profile keeps
    -0.0), a negative value that rounds to zero gives -0.0."""
    x = torch.tensor([[-0.0, -1e-3, 0.0] + [6.0] + [0.0] * 12])
    amax = torch.tensor([6.0])
    y_vllm, y_ct = fake_quantize(x, VLLM, global_amax=amax), fake_quantize(x, CT, global_amax=amax)
    assert torch.signbit(y_ct[0, 0]) and not torch.signbit(y_vllm[0, 0])
    assert torch.signbit(y_vllm[0, 1]) and y_vllm[0, 1].item() == 0.0
    assert _identical(y_vllm, _oracle(x, amax))


@pytest.mark.parametrize("dtype,expect_diff", [(torch.float32, False), (torch.bfloat16, True)])
def test_diff_rates(dtype, expect_diff):
    """Random normal activations (256 x 1024, dynamic scale): fp32 values agree everywhere; bf16 inputs, whose few
    mantissa bits put ``x / eff`` exactly on E2M1 ties far more often, differ on about 0.05% of the elements, and
    every such element is a tie in compressed_tensors' arithmetic (``x / eff`` within 4 ulps of an E2M1 midpoint)."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    y_vllm, y_ct = fake_quantize(x, VLLM), fake_quantize(x, CT)
    diff = y_vllm != y_ct
    assert bool(diff.any()) is expect_diff
    if expect_diff:
        assert diff.float().mean().item() < 2e-3
        q = quantize(x, CT)
        eff = (q.scales.float() / q.global_scale).repeat_interleave(16, dim=-1)
        scaled = (x.float() / eff)[diff].abs()
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
        dist = (scaled[:, None] - mids).abs().amin(dim=1)
        assert bool((dist <= 4 * torch.finfo(torch.float32).eps * scaled).all())
