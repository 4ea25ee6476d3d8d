"""Public API of quarl.formats: format resolution and validation, QuantizedTensor contents, fake_quantize ==
dequantize(quantize), STE gradients (identity and clipped), no graph under no_grad, axis / 2-D blocks / Hadamard /
static global amax, stochastic rounding, SQNR floors.

Run: python -m pytest tests/formats/test_api.py -q
"""

import doctest

import pytest
import torch

import quarl.formats.fake_quant as fake_quant_module
from quarl.formats import (
    FORMATS, Profile, QFormat, RoundingMode, ScaleMode, dequantize, fake_quantize, get_format, quantize,
)
from quarl.formats.blocking import to_blocks
from quarl.formats.hadamard import hadamard_matrix, rotate

NAMES = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "nvfp4", "fp8_e4m3",
         "fp8_e5m2", "int8", "int4", "nf4"]
VARIANTS = [(n, {}) for n in NAMES] + [
    ("mxfp4", {"scale_mode": "rceil"}), ("mxfp4", {"scale_mode": "even"}), ("mxfp4", {"scale_mode": "ceil"}),
    ("mxfp4", {"rounding": "half_away"}), ("mxfp8_e4m3", {"profile": "compressed_tensors"}),
    ("nvfp4", {"profile": "torchao"}), ("nvfp4", {"profile": "transformer_engine"}), ("nvfp4", {"block_2d": True}),
    ("nvfp4", {"hadamard": True}), ("mxfp4", {"axis": 0}), ("int8", {"granularity": "per_tensor"}),
    ("int4", {"group_size": 32}), ("fp8_e4m3", {"granularity": "per_token"}), ("nvfp4", {"profile": "vllm"}),
    ("nvfp4", {"tensor_scale": "per_token"}), ("mxfp4", {"rounding": "stochastic", "seed": 3}),
]


def _x(shape=(32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0]).unsqueeze(1)


def _same(a, b):
    """Bitwise equality including NaN positions and the sign of zero."""
    return torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b, nan=7.0)) and torch.equal(
        torch.signbit(a), torch.signbit(b)) and torch.equal(torch.isnan(a), torch.isnan(b))


def test_formats_registry_lists_every_name():
    assert list(FORMATS) == NAMES
    assert all(isinstance(f, QFormat) and f.name == n for n, f in FORMATS.items())


def test_get_format_options_and_enums():
    f = get_format("mxfp4", scale_mode="rceil", rounding=RoundingMode.HALF_AWAY)
    assert f.scale_mode is ScaleMode.RCEIL and f.rounding is RoundingMode.HALF_AWAY and f.block_size == 32
    assert get_format("nvfp4").profile is Profile.COMPRESSED_TENSORS
    assert get_format("mxfp4", profile="compressed_tensors").scale_mode is ScaleMode.EVEN
    assert get_format(get_format("int4"), group_size=64).block_size == 64
    assert get_format("int8", granularity="per_group").block_size == 128
    with pytest.raises(AttributeError):
        f.block_size = 16  # frozen


@pytest.mark.parametrize("call,match", [
    (lambda: get_format("mxfp5"), r"unknown format 'mxfp5' \(did you mean 'mxfp4'\?\); valid formats: mxfp4"),
    (lambda: get_format("mxfp4", scale_mod="floor"), r"unknown option 'scale_mod'.*did you mean 'scale_mode'"),
    (lambda: get_format("mxfp4", scale_mode="flor"), r"invalid scale_mode='flor'.*valid values: floor, ceil"),
    (lambda: get_format("nvfp4", scale_mode="floor"), r"unknown option 'scale_mode' for nvfp4"),
    (lambda: get_format("nvfp4", profile="ocp"), r"valid profiles: compressed_tensors, torchao, transformer_engine"),
    (lambda: get_format("mxfp6_e3m2", profile="compressed_tensors"), r"only for mxfp4, mxfp6_e2m3, mxfp8_e4m3"),
    (lambda: get_format("mxfp4", profile="compressed_tensors", scale_mode="floor"), r"fixes scale_mode='even'"),
    (lambda: get_format("int8", group_size=32), r"group_size needs granularity='per_group'"),
    (lambda: get_format("mxfp4", block_size=0), r"positive int"),
    (lambda: get_format("nvfp4", hadamard_signs=(1,) * 15), r"16 values"),
    (lambda: get_format("mxfp4", block_2d=True), r"unknown option 'block_2d'"),
    (lambda: fake_quantize(torch.ones(32), "mxfp4", ste="straight"), r"invalid ste='straight'"),
    (lambda: fake_quantize(torch.ones(32, dtype=torch.int32), "mxfp4"), r"floating-point"),
    (lambda: quantize(torch.ones(32), "mxfp4", global_amax=torch.ones(1)), r"NVFP4 option"),
    # an out-of-range axis must not wrap around (5 % 2 == -3 % 2 == 1 would silently mean axis 1)
    (lambda: fake_quantize(torch.ones(4, 64), "mxfp4", axis=5), r"axis=5 is out of range for a 2-D tensor"),
    (lambda: fake_quantize(torch.ones(4, 64), "mxfp4", axis=-3), r"axis=-3 is out of range for a 2-D tensor"),
    (lambda: quantize(torch.ones(4, 64), "mxfp4", axis=2), r"axis=2 is out of range for a 2-D tensor"),
    (lambda: quantize(torch.ones(4, 64), "int4", axis=-3), r"axis=-3 is out of range for a 2-D tensor"),
    (lambda: fake_quantize(torch.ones(4, 64), "nvfp4", axis=3, hadamard=True), r"axis=3 is out of range"),
    (lambda: fake_quantize(torch.ones(0, 64), "nf4", axis=2), r"axis=2 is out of range for a 2-D tensor"),
    (lambda: fake_quantize(torch.ones(64), "fp8_e4m3", granularity="per_channel", axis=1), r"for a 1-D tensor"),
])
def test_invalid_inputs_raise_with_valid_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("name,opts", VARIANTS, ids=lambda v: str(v))
def test_fake_quantize_equals_dequantize_of_quantize(name, opts):
    x = _x()
    x[3, :20] = 0.0
    x[4, 5] = -0.0
    fmt = get_format(name, **opts)
    y = fake_quantize(x, fmt)
    q = quantize(x, fmt)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape and q.shape == x.shape
    assert _same(y, dequantize(q))
    assert _same(fake_quantize(x, name, **opts), y)  # name + options path


def test_quantized_tensor_scale_storage():
    x = _x((4, 64))
    mx = quantize(x, "mxfp4")
    assert mx.scales.dtype == torch.uint8 and mx.scales.shape == (4, 2) and mx.global_scale is None
    nv = quantize(x, "nvfp4")
    assert nv.scales.dtype == torch.float8_e4m3fn and nv.scales.shape == (4, 4) and nv.global_scale.shape == (1,)
    assert quantize(x, "fp8_e4m3").scales.shape == (1,)
    assert quantize(x, "int8").scales.shape == (4, 1)
    assert quantize(x, "mxfp4", axis=0).scales.shape == (1, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_in_dtype_out_computed_in_fp32(dtype):
    x = _x((8, 64)).clamp(-1e4, 1e4).to(dtype)
    y = fake_quantize(x, "nvfp4")
    assert y.dtype == dtype and dequantize(quantize(x, "nvfp4")).dtype == dtype
    assert torch.equal(y, fake_quantize(x.float(), "nvfp4").to(dtype))


def test_ste_identity_gradient():
    x = _x((4, 64)).requires_grad_()
    g = torch.randn(4, 64)
    fake_quantize(x, "mxfp4").backward(g)
    assert torch.equal(x.grad, g)


def test_ste_clipped_zeroes_saturated_elements():
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 2] = 7.0, 6.0, 1.0  # FLOOR: scale 1, 7 saturates to 6; 6 and 1 are representable
    x.requires_grad_()
    fake_quantize(x, "mxfp4", ste="clipped").sum().backward()
    assert x.grad[0, :3].tolist() == [0.0, 1.0, 1.0] and bool((x.grad[0, 3:] == 1).all())
    x.grad = None
    fake_quantize(x, "mxfp4", ste="identity").sum().backward()
    assert bool((x.grad == 1).all())


def test_no_graph_under_no_grad(monkeypatch):
    calls = []
    original = fake_quant_module._FakeQuantSTE.apply
    monkeypatch.setattr(fake_quant_module._FakeQuantSTE, "apply", lambda *a: calls.append(1) or original(*a))
    x = _x((4, 64)).requires_grad_()
    with torch.no_grad():
        y = fake_quantize(x, "nvfp4")
    assert y.grad_fn is None and not y.requires_grad and calls == []
    z = fake_quantize(x, "nvfp4")
    assert z.grad_fn is not None and calls == [1]


def test_axis_bounds_negative_and_low_level_helpers():
    x = _x((64, 32))
    assert torch.equal(fake_quantize(x, "mxfp4", axis=-2), fake_quantize(x, "mxfp4", axis=0))  # -ndim is valid
    for axis in (2, -3):  # `axis % ndim` used to map both to a valid axis
        with pytest.raises(ValueError, match=f"axis={axis} is out of range for a 2-D tensor"):
            to_blocks(x, axis, 32)
        with pytest.raises(ValueError, match=f"axis={axis} is out of range"):
            rotate(x, (1,) * 16, axis)


def test_axis_equals_transpose():
    x = _x((64, 32))
    assert torch.equal(fake_quantize(x, "mxfp4", axis=0), fake_quantize(x.t().contiguous(), "mxfp4").t())
    assert torch.equal(fake_quantize(x, "int4", axis=0, group_size=32),
                       fake_quantize(x.t().contiguous(), "int4", group_size=32).t())


def test_nvfp4_block_2d_shares_one_scale_per_16x16_tile():
    x = _x((32, 64))
    q = quantize(x, "nvfp4", block_2d=True)
    s = q.scales.float()
    for r0 in (0, 16):
        tile_rows = s[r0:r0 + 16]
        assert torch.equal(tile_rows, tile_rows[:1].expand_as(tile_rows))
    # the tile scale is what the 1x16 rule gives to the tile's max block
    one_d = quantize(x, "nvfp4").scales.float()
    assert torch.equal(s[:16].amax(0), one_d[:16].amax(0))


def test_hadamard_is_orthonormal_and_fake_quantize_returns_the_original_basis():
    r = hadamard_matrix(tuple(get_format("nvfp4").hadamard_signs))
    assert torch.equal(r @ r.t(), torch.eye(16))
    x = _x((8, 64))
    fmt = get_format("nvfp4", hadamard=True)
    y = fake_quantize(x, fmt)
    rotated = rotate(x, fmt.hadamard_signs)
    q = quantize(x, fmt)
    assert torch.equal(q.codes, quantize(rotated, "nvfp4").codes)  # codes live in the rotated basis
    expected = rotate(fake_quantize(rotated, "nvfp4"), fmt.hadamard_signs, inverse=True)
    assert torch.equal(y, expected)  # values come back in the original basis
    assert float((y - x).pow(2).mean() / x.pow(2).mean()) < 0.02  # close to x: it is the same basis


def test_nvfp4_static_global_amax():
    x = _x((4, 64))
    own = fake_quantize(x, "nvfp4")
    assert torch.equal(fake_quantize(x, "nvfp4", global_amax=x.abs().amax().reshape(1)), own)
    q = quantize(x, "nvfp4", global_amax=torch.tensor([1000.0]))
    assert q.global_scale.item() == pytest.approx(2688 / 1000, rel=1e-6)  # rel: fp32 reciprocal*2688


def test_stochastic_rounding_is_seeded_and_unbiased():
    x = torch.full((64, 32), 0.3)
    x[:, 0] = 6.0  # amax 6 -> scale 1: 0.3 lies between grid points 0 and 0.5
    a = fake_quantize(x, "mxfp4", rounding="stochastic", seed=1)
    assert torch.equal(a, fake_quantize(x, "mxfp4", rounding="stochastic", seed=1))
    assert not torch.equal(a, fake_quantize(x, "mxfp4", rounding="stochastic", seed=2))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(fake_quantize(x, "mxfp4", rounding="stochastic", generator=g1),
                       fake_quantize(x, "mxfp4", rounding="stochastic", generator=g2))
    vals = a[:, 1:]
    assert set(vals.unique().tolist()) <= {0.0, 0.5}
    # E = 0.3; n = 1984 Bernoulli(0.6) draws * 0.5: std of the mean = 0.5*sqrt(.24/1984) = 0.0055; 5 sigma = 0.028
    assert abs(vals.mean().item() - 0.3) < 0.028


@pytest.mark.parametrize("name,floor_db", [("mxfp4", 13.0), ("nvfp4", 13.0), ("mxfp6_e2m3", 20.0),
                                           ("mxfp8_e4m3", 25.0), ("int8", 35.0), ("nf4", 13.0), ("int4", 13.0)])
def test_sqnr_floor_on_randn(name, floor_db):
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    y = fake_quantize(x, name)
    sqnr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())
    assert sqnr >= floor_db


def test_docstring_examples():
    result = doctest.testmod(fake_quant_module, verbose=False)
    assert result.attempted >= 1 and result.failed == 0
