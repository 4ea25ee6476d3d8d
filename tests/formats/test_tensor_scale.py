"""`tensor_scale` = dynamic | static | per_token: where the NVFP4 global scale / the FP8 per-tensor scale comes from.

Run: pytest tests/formats/test_tensor_scale.py -q

* static with the tensor's own amax is bit-identical to dynamic (every NVFP4 profile, FP8), so the static path adds
  nothing but the source of ``T``; a static format without a calibrated amax raises everywhere (never dynamic);
* per_token is, row by row, exactly the per-tensor dynamic result of that row (every NVFP4 profile), stores one
  global scale per row, and round-trips through quantize / dequantize;
* static FP8 is compressed-tensors' static activation formula ``e4m3(clamp(x / s, +-448)) * s``, ``s = amax / 448``
  (torch's saturating float8 cast as the reference), saturating beyond the calibrated amax;
* the native kernel and the compiled path never serve a mode they do not implement (results equal eager).
"""

from __future__ import annotations

import pytest
import torch

from quarl.formats import TensorScale, dequantize, fake_quantize, fake_quantizer, get_format, quantize
from quarl.formats import fast, native
from quarl.formats.quantize import fake_quantize_eager

NV_PROFILES = ("compressed_tensors", "torchao", "transformer_engine", "vllm")


def _x(rows: int = 8, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.logspace(-2, 2, rows).reshape(rows, 1)  # rows of very different amax


@pytest.mark.parametrize("profile", NV_PROFILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_with_own_amax_equals_dynamic(profile, dtype):
    x = _x().to(dtype)
    static = get_format("nvfp4", profile=profile, tensor_scale="static")
    amax = x.float().abs().amax().reshape(1)
    assert torch.equal(fake_quantize(x, static, global_amax=amax), fake_quantize(x, "nvfp4", profile=profile))
    assert torch.equal(quantize(x, static, global_amax=amax).global_scale,
                       quantize(x, "nvfp4", profile=profile).global_scale)


def test_static_differs_from_dynamic_with_a_calibrated_amax():
    x = _x()
    static = get_format("nvfp4", tensor_scale="static")
    calibrated = torch.tensor([4 * x.abs().amax().item()])
    assert not torch.equal(fake_quantize(x, static, global_amax=calibrated), fake_quantize(x, "nvfp4"))


@pytest.mark.parametrize("name,options", [("nvfp4", {}), ("nvfp4", {"profile": "vllm"}), ("fp8_e4m3", {}),
                                          ("int8", {"granularity": "per_tensor"})])
def test_static_without_amax_raises_everywhere(name, options):
    fmt = get_format(name, tensor_scale="static", **options)
    x = _x()
    for call in (lambda: fake_quantize(x, fmt), lambda: quantize(x, fmt), lambda: fake_quantizer(fmt),
                 lambda: fake_quantize(x.requires_grad_(), fmt)):
        with pytest.raises(ValueError, match="tensor_scale='static' needs a calibrated global_amax"):
            call()


@pytest.mark.parametrize("profile", NV_PROFILES)
def test_per_token_is_per_row_dynamic(profile):
    x = _x()
    fmt = get_format("nvfp4", profile=profile, tensor_scale="per_token")
    y = fake_quantize(x, fmt)
    for r in range(x.shape[0]):
        assert torch.equal(y[r:r + 1], fake_quantize(x[r:r + 1], "nvfp4", profile=profile))
    q = quantize(x, fmt)
    assert q.global_scale.shape == (x.shape[0], 1)
    assert torch.equal(dequantize(q), y)
    assert not torch.equal(y, fake_quantize(x, "nvfp4", profile=profile))  # rows of different amax: not per-tensor


def test_per_token_nd_and_other_axis():
    x = _x(rows=12, cols=48).reshape(3, 4, 48)
    fmt = get_format("nvfp4", tensor_scale="per_token")
    y = fake_quantize(x, fmt)
    assert torch.equal(y.reshape(12, 48), fake_quantize(x.reshape(12, 48), fmt))
    fmt0 = get_format("nvfp4", tensor_scale="per_token", axis=0)
    xt = _x(rows=32, cols=5)
    assert torch.equal(fake_quantize(xt, fmt0), fake_quantize(xt.t().contiguous(), fmt).t())
    q = quantize(xt, fmt0)
    assert q.global_scale.shape == (1, 5) and torch.equal(dequantize(q), fake_quantize(xt, fmt0))


def test_per_token_nonfinite_stays_in_its_row():
    x = _x()
    x[2, 5] = float("inf")
    y = fake_quantize(x, get_format("nvfp4", tensor_scale="per_token", nonfinite="block"))
    clean = fake_quantize(_x(), get_format("nvfp4", tensor_scale="per_token"))
    rows = [r for r in range(x.shape[0]) if r != 2]
    assert torch.equal(y[rows], clean[rows])
    assert torch.isnan(y[2, :16]).all() and not torch.isnan(y[2, 16:]).any()


@pytest.mark.parametrize("call,match", [
    (lambda: get_format("fp8_e4m3", tensor_scale="per_token"), "granularity='per_token'"),
    (lambda: get_format("fp8_e4m3", tensor_scale="static", granularity="per_token"), "needs granularity='per_tensor'"),
    (lambda: get_format("nvfp4", tensor_scale="per_token", block_2d=True), "block_2d"),
    (lambda: get_format("mxfp4", tensor_scale="static"), "unknown option 'tensor_scale'"),
    (lambda: get_format("nvfp4", tensor_scale="calibrated"), "valid"),
    (lambda: fake_quantize(_x(), "nvfp4", tensor_scale="per_token", global_amax=torch.ones(1)), "per_token"),
    (lambda: fake_quantize(_x(), "fp8_e4m3", granularity="per_token", global_amax=torch.ones(1)), "per-tensor amax"),
])
def test_invalid_combinations_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_enum_values():
    assert [m.value for m in TensorScale] == ["dynamic", "static", "per_token"]
    assert get_format("nvfp4").tensor_scale is TensorScale.DYNAMIC


@pytest.mark.parametrize("amax", [0.5, 3.0, 1e3])
def test_fp8_static_is_compressed_tensors_static_formula(amax):
    x = _x()
    fmt = get_format("fp8_e4m3", tensor_scale="static")
    a = torch.tensor([amax])
    s = a / 448.0
    expected = ((x / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32) * s)
    assert torch.equal(fake_quantize(x, fmt, global_amax=a), expected)
    q = quantize(x, fmt, global_amax=a)
    assert torch.equal(q.scales, s) and torch.equal(dequantize(q), expected)


def test_fp8_static_zero_amax_uses_eps_and_nan_poisons():
    fmt = get_format("fp8_e4m3", tensor_scale="static")
    x = _x()
    assert quantize(x, fmt, global_amax=torch.zeros(1)).scales.item() == torch.finfo(torch.float32).eps
    x[0, 0] = float("nan")
    assert torch.isnan(fake_quantize(x, fmt, global_amax=torch.tensor([3.0]))).all()  # the tensor is the group


def test_fake_quantizer_static_equals_fake_quantize_and_passes_gradient():
    fmt = get_format("nvfp4", tensor_scale="static")
    a = torch.tensor([7.5])
    fq = fake_quantizer(fmt, global_amax=a)
    x = _x()
    assert torch.equal(fq(x), fake_quantize(x, fmt, global_amax=a))
    xg = x.clone().requires_grad_()
    fq(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


def test_kernels_do_not_serve_modes_they_lack():
    vllm = get_format("nvfp4", profile="vllm")
    assert native.serves(vllm) and not fast.enabled_for(torch.empty(1 << 19), vllm)  # native C, else eager
    assert not fast.enabled_for(torch.empty(1 << 19), get_format("nvfp4", tensor_scale="per_token"))
    assert native.bind(get_format("nvfp4", tensor_scale="static")) is None
    big = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    served = native.fake_quantize(big, vllm)
    assert served is not None and torch.equal(served.view(torch.int32), fake_quantize_eager(big, vllm).view(torch.int32))
    static = get_format("nvfp4", tensor_scale="static")
    a = torch.tensor([2.0])
    assert torch.equal(fake_quantize(big, static, global_amax=a), fake_quantize_eager(big, static, None, a))


@pytest.mark.parametrize("profile", ["compressed_tensors", "torchao", "transformer_engine"])
@pytest.mark.parametrize("nonfinite", ["reference", "block"])
def test_per_token_native_rows_equal_eager(profile, nonfinite):
    """The native kernel runs per_token row by row with the row's amax as a static T: bit-identical to eager on the
    adversarial families, partial blocks, all-zero rows and rows holding NaN / Inf (which eager may take over)."""
    from _adversarial import FINITE
    from _adversarial import nonfinite as with_nonfinite

    fmt = get_format("nvfp4", profile=profile, tensor_scale="per_token", nonfinite=nonfinite)
    run = native.bind(fmt)
    assert run is not None
    cases = [FINITE[f](rows=16, cols=64, seed=1) for f in ("outliers", "nv_ties", "tiny", "huge", "zero_blocks")]
    cases += [FINITE["normal"](rows=6, cols=40, seed=2), torch.zeros(3, 32)]
    cases += [with_nonfinite(FINITE["normal"](rows=8, cols=64, seed=4), seed=5, frac=0.01)]
    cases += [FINITE["outliers"](rows=16, cols=64, seed=1).to(torch.bfloat16)]
    for x in cases:
        want = fake_quantize_eager(x, fmt)
        y = run(x)
        if y is not None:
            assert torch.equal(torch.isnan(y), torch.isnan(want))
            keep = ~torch.isnan(y)
            assert torch.equal(y[keep].view(torch.int32), want[keep].view(torch.int32))  # sign of zero too
        got = fake_quantize(x, fmt)
        assert torch.equal(torch.isnan(got), torch.isnan(want.to(x.dtype)))
    served = run(FINITE["outliers"](rows=16, cols=64, seed=1))
    assert served is not None  # finite rows are the kernel's
