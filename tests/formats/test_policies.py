"""Documented policies of quarl.formats: non-finite input, -0.0, zero blocks and all-zero tensors, a last dim not
divisible by the block size (zero padding), empty tensors.

Run: python -m pytest tests/formats/test_policies.py -q
"""

import pytest
import torch

from quarl.formats import FORMATS, dequantize, fake_quantize, get_format, quantize

DEFAULTS = list(FORMATS)
NV_PROFILES = ["compressed_tensors", "torchao", "transformer_engine", "vllm"]


def _rows(n_rows=4, n=64, seed=0):
    return torch.randn(n_rows, n, generator=torch.Generator().manual_seed(seed))


def _block_of(name):
    fmt = get_format(name)
    return fmt.block_size if fmt.block_size else None


@pytest.mark.parametrize("name", DEFAULTS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_poisons_only_its_block(name, bad):
    # nvfp4's default is nonfinite="reference" (tests/formats/test_policies_nonfinite.py); "block" is this policy
    x = _rows(4, 128)
    x[1, 3] = bad
    fmt = get_format(name, nonfinite="block") if name == "nvfp4" else get_format(name)
    y = fake_quantize(x, fmt)
    if fmt.granularity.value == "per_tensor" and fmt.family.value == "scaled":
        assert bool(torch.isnan(y).all())  # the whole tensor is one group
        return
    block = fmt.block_size or 128
    b0 = (3 // block) * block
    assert bool(torch.isnan(y[1, b0:b0 + block]).all())
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, b0:b0 + block] = False
    assert not bool(torch.isnan(y[mask]).any())
    assert torch.equal(torch.isnan(dequantize(quantize(x, fmt))), torch.isnan(y))


@pytest.mark.parametrize("profile", NV_PROFILES)
def test_nvfp4_block_policy_global_amax_ignores_nonfinite(profile):
    x = _rows(4, 64)
    clean = fake_quantize(x, "nvfp4", profile=profile)
    x[0, 0] = float("inf")
    y = fake_quantize(x, "nvfp4", profile=profile, nonfinite="block")
    assert torch.equal(y[1:], clean[1:]) and torch.equal(y[0, 16:], clean[0, 16:])


@pytest.mark.parametrize("name", DEFAULTS)
def test_all_zero_tensor_gives_zeros_in_default_profiles(name):
    x = torch.zeros(4, 128)
    x[0, 1] = -0.0
    y = fake_quantize(x, name)
    assert torch.equal(y, torch.zeros_like(y))  # no NaN, no Inf


def test_all_zero_tensor_nvfp4_profiles():
    x = torch.zeros(2, 32)
    assert torch.equal(fake_quantize(x, "nvfp4", profile="transformer_engine"), x)
    # +0.0 stays +0.0 (the signs of zero are compared too): TE stores T = amax and multiplies by it, and
    # max(-lo, hi) = max(-0.0, +0.0) used to give T = -0.0, turning every +0.0 into -0.0
    for profile in ("compressed_tensors", "transformer_engine"):
        assert not bool(torch.signbit(fake_quantize(x, "nvfp4", profile=profile)).any()), profile
        assert bool(torch.signbit(fake_quantize(-x, "nvfp4", profile=profile)).all()), profile
    assert not bool(torch.signbit(quantize(x, "nvfp4", profile="transformer_engine").global_scale).any())
    assert bool(torch.isnan(fake_quantize(x, "nvfp4", profile="torchao")).all())  # torchao's 0/0, reproduced


@pytest.mark.parametrize("name", DEFAULTS)
def test_zero_block_in_nonzero_tensor(name):
    x = _rows(4, 128)
    x[2, :64] = 0.0
    y = fake_quantize(x, name)
    assert torch.equal(y[2, :64], torch.zeros(64)) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name", [n for n in DEFAULTS if n not in ("int8", "int4", "mxint8", "nf4")])
def test_negative_zero_keeps_its_sign_on_float_grids(name):
    x = _rows(2, 64)
    x[0, 1] = -0.0
    x[0, 2] = -1e-30  # rounds to zero: -0.0
    y = fake_quantize(x, name)
    assert torch.signbit(y[0, 1]) and torch.signbit(y[0, 2]) and y[0, 1] == 0 and y[0, 2] == 0


@pytest.mark.parametrize("name", ["int8", "int4", "mxint8", "nf4"])
def test_integer_grids_return_positive_zero(name):
    x = _rows(2, 64)
    x[0, 1] = -0.0
    x[0, 2] = -1e-30
    y = fake_quantize(x, name)
    assert not torch.signbit(y[0, 1]) and not torch.signbit(y[0, 2])


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "int4", "nf4", "mxfp8_e4m3"])
def test_indivisible_last_dim_is_zero_padded(name):
    block = _block_of(name)
    n = 2 * block + 5
    x = _rows(3, n)
    y = fake_quantize(x, name)
    padded = torch.nn.functional.pad(x, (0, block - 5))
    ref = fake_quantize(padded, name)[:, :n]
    assert y.shape == x.shape and torch.equal(y, ref)
    q = quantize(x, name)
    assert q.codes.shape == x.shape and q.scales.shape[-1] == 3
    assert torch.equal(dequantize(q), y)


@pytest.mark.parametrize("name", DEFAULTS)
@pytest.mark.parametrize("shape", [(0,), (0, 64), (4, 0)])
def test_empty_tensors(name, shape):
    x = torch.empty(shape, dtype=torch.bfloat16)
    y = fake_quantize(x, name)
    assert y.shape == x.shape and y.dtype == x.dtype
    q = quantize(x, name)
    assert q.codes.shape == x.shape and dequantize(q).shape == x.shape


def test_one_dim_and_high_rank_inputs():
    x = torch.randn(2, 3, 4, 64, generator=torch.Generator().manual_seed(1))
    y = fake_quantize(x, "mxfp4")
    assert torch.equal(y.reshape(-1, 64), fake_quantize(x.reshape(-1, 64), "mxfp4"))
    assert torch.equal(fake_quantize(x.reshape(-1), "mxfp4"), y.reshape(-1))
