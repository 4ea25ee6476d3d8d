"""Cross-check `quarl.formats` against compressed-tensors 0.20.0 itself (not a transcription): bit for bit.

Run: pytest tests/formats/test_xcheck_compressed_tensors.py -q

The reference side calls compressed-tensors' own entry points the way llm-compressor does (observer min/max ->
`calculate_qparams` / `compute_dynamic_scales_and_zp`, `generate_gparam` for the NVFP4 global scale, then
`lifecycle.forward.fake_quantize` / `quantize` / `dequantize`, and the NVFP4 / MXFP4 packed compressors for the
on-disk codes and scales). Every comparison is exact (`torch.equal`, NaN positions included); no ulp tolerance is
needed anywhere here.

Inputs are the finite adversarial families of `_adversarial.py` (random, outliers, exact ties, powers of two and
their neighbours, fp32 subnormals, huge, zero blocks, the all-zero tensor), in fp32 and bf16; the default run takes
the edge-case families, `-m slow` runs the full family x dtype sweep (`_adversarial.sweep`). For bf16 inputs the
reference is fed `x.float()`: quarl computes in fp32 for every input dtype (documented API contract), whereas
compressed-tensors computes `amax / 6` and the global scale in the *input* dtype (see
`test_ct_bf16_computes_scales_in_bf16`, which shows the difference so the documentation stays true).

Differences that quarl documents and deliberately does not reproduce, excluded exactly where they apply:

1. Sign of zero (docs/formats.md difference 10). compressed-tensors adds its symmetric zero point (+0.0) to the scaled
   value `x / scale`, so wherever that is `-0.0` (an input -0.0, or a tiny negative that underflows in the division)
   CT's grid value is +0.0 and its code has no sign bit; quarl keeps -0.0 (code with only the sign bit). Excluded:
   exactly the elements whose CT scaled value is -0.0 (there quarl's code must be the sign-bit code and CT's must be 0).
   Values are equal there under `==`. `test_ct_negative_zero_code` shows it.
2. CT MX scale overflow (found by these tests, see `test_ct_mx_scale_overflows_at_top_binade`): CT's
   `round_to_power_2` adds the rounding bit to the fp32 bits of amax, so a block amax >= 1.75 * 2^127 becomes Inf,
   the scale 2^128 = Inf and the whole block NaN. quarl clamps the exponent (byte 253 for mxfp4). Excluded: exactly
   the blocks whose CT scale is Inf.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _adversarial import FINITE, sweep
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)

from quarl.formats import dequantize, fake_quantize, get_format, quantize

logging.getLogger("compressed_tensors").setLevel(logging.ERROR)

def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN == NaN, same shape and dtype (the sign of zero is not compared: -0.0 == 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _input(family: str, dtype: torch.dtype, cols: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype`, the fp32 tensor handed to compressed-tensors = x.float())."""
    x = FINITE[family](rows=32, cols=cols, seed=1).to(dtype)
    return x, x.float()


def _fp4_codes_from_packed(packed: torch.Tensor) -> torch.Tensor:
    """Unpacked E2M1 codes from CT's packed bytes (low nibble = even element), independent of quarl.unpack_fp4."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _neg_zero(t: torch.Tensor) -> torch.Tensor:
    return (t == 0) & torch.signbit(t)


def _ct_group_scaled(x: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:
    """CT's scaled value `x / eff` with one `eff` per group of `x.shape[-1] // eff.shape[-1]` elements (fp32)."""
    g = x.shape[-1] // eff.shape[-1]
    return (x.unflatten(-1, (eff.shape[-1], g)) / eff.unsqueeze(-1)).flatten(-2)


def _assert_codes(quarl_codes: torch.Tensor, ct_codes: torch.Tensor, ct_scaled: torch.Tensor, sign_code: int) -> None:
    """Codes equal except where CT's scaled value is -0.0 (difference 1): quarl `sign_code`, CT 0 there."""
    neg0 = _neg_zero(ct_scaled)
    assert torch.equal(quarl_codes[~neg0].to(torch.int32), ct_codes[~neg0].to(torch.int32))
    assert bool((quarl_codes[neg0] == sign_code).all()) and bool((ct_codes[neg0] == 0).all())


# ----------------------------------------------------------------------------------------------- NVFP4 (CT profile)
def _ct_nvfp4(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors NVFP4 (preset "NVFP4" weights, TENSOR_GROUP g16, e4m3 scales) on fp32 `x` (rows, cols)."""
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    args = scheme.weights
    gs = generate_gparam(x.amin(), x.amax())  # llm-compressor: global min/max of the weight
    scale, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=gs)
    fq = ct_fake_quantize(x, scale, zp, args, global_scale=gs)
    sd = NVFP4PackedCompressor.compress({"weight": x, "weight_scale": scale, "weight_global_scale": gs}, scheme)
    values = unpack_fp4_from_uint8(sd["weight_packed"], *x.shape, dtype=torch.float32)
    deq = ct_dequantize(values, scale, args=args, global_scale=gs, dtype=torch.float32)
    return {"codes": _fp4_codes_from_packed(sd["weight_packed"]), "scales": sd["weight_scale"], "gs": gs,
            "deq": deq, "fq": fq, "packed": sd["weight_packed"], "scaled": _ct_group_scaled(x, scale / gs)}


_NV_FAST = ("normal", "nv_ties", "pow2_neighbours", "tiny", "zero_blocks", "all_zero", "huge", "outliers")


@pytest.mark.parametrize("family,dtype", sweep(_NV_FAST))
def test_nvfp4_matches_ct(family: str, dtype: torch.dtype) -> None:
    x, x32 = _input(family, dtype)
    ref = _ct_nvfp4(x32)
    fmt = get_format("nvfp4", profile="compressed_tensors")
    q = quantize(x, fmt)
    assert torch.equal(q.global_scale, ref["gs"])
    assert torch.equal(q.scales.view(torch.uint8), ref["scales"].view(torch.uint8))
    _assert_codes(q.codes, ref["codes"], ref["scaled"], 8)
    assert _same(dequantize(q), ref["deq"].to(dtype))
    assert _same(fake_quantize(x, fmt), ref["fq"].to(dtype))


def test_nvfp4_packing_matches_ct() -> None:
    """quarl.pack_fp4 of quarl's codes == the bytes CT's NVFP4 compressor writes (`weight_packed`)."""
    from quarl.formats import pack_fp4, unpack_fp4

    x = FINITE["normal"](rows=32, cols=128, seed=3)
    q = quantize(x, "nvfp4")
    ref = _ct_nvfp4(x)
    assert torch.equal(pack_fp4(q.codes), ref["packed"])
    assert torch.equal(unpack_fp4(ref["packed"]), q.codes)


def test_ct_negative_zero_code() -> None:
    """docs/formats.md difference 10: -0.0 -> CT code 0, quarl code 8; a tiny negative that rounds to 0 -> code 8 in
    both."""
    x = torch.zeros(1, 16)
    x[0, 0] = 6e30  # amax: gs = 2688 / 6e30, s8 = 448, scale = s8 / gs = 1e30
    x[0, 1] = -0.0
    x[0, 2] = -1e27  # x / scale = -1e-3: rounds to zero, sign kept by both
    x[0, 3] = -1e-20  # x / scale underflows to -0.0: CT adds its zero point (+0.0) and drops the sign
    ref = _ct_nvfp4(x)
    q = quantize(x, "nvfp4")
    assert ref["codes"][0, 1] == 0 and q.codes[0, 1] == 8
    assert ref["codes"][0, 2] == 8 and q.codes[0, 2] == 8
    assert ref["codes"][0, 3] == 0 and q.codes[0, 3] == 8
    assert torch.equal(dequantize(q), ref["deq"])  # -0.0 == 0.0


def test_ct_bf16_computes_scales_in_bf16() -> None:
    """CT run on a bf16 tensor rounds `448*6/amax` and `amax/6` to bf16; quarl (and CT on x.float()) does not.

    This is why the bf16 cross-checks feed `x.float()` to compressed-tensors. If this starts failing, CT changed
    its dtype handling and the bf16 cross-checks above should feed `x` directly.
    """
    x = FINITE["normal"](rows=32, cols=128, seed=1).to(torch.bfloat16)
    gs_bf16 = generate_gparam(x.amin(), x.amax())
    gs_fp32 = generate_gparam(x.float().amin(), x.float().amax())
    assert not torch.equal(gs_bf16, gs_fp32)
    assert torch.equal(quantize(x, "nvfp4").global_scale, gs_fp32)


# ----------------------------------------------------------------------------------------------- MX (CT profile)
_CT_MX = {"mxfp4": ("MXFP4", 4), "mxfp8_e4m3": ("MXFP8", 8)}


def _ct_mx(x: torch.Tensor, preset: str) -> dict[str, torch.Tensor]:
    """compressed-tensors MX (GROUP g32, uint8 E8M0 scales) on fp32 `x`: fake-quant, scale bytes, values."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    args = scheme.weights
    scale, zp = compute_dynamic_scales_and_zp(x, args, None)  # float 2^e scales
    out = {
        "scale": scale,
        "scaled": _ct_group_scaled(x, scale),
        "fq": ct_fake_quantize(x, scale, zp, args),
        "scales": compress_mx_scale(scale, torch.uint8),  # what the MX compressors write (`weight_scale`)
        "grid": ct_quantize(x, scale, zp, args),  # element values on the grid, fp32
    }
    out["deq"] = ct_dequantize(out["grid"], scale, args=args, dtype=torch.float32)
    if args.num_bits == 4:
        sd = MXFP4PackedCompressor.compress({"weight": x, "weight_scale": scale}, scheme)
        assert torch.equal(sd["weight_scale"], out["scales"])
        out["codes"] = _fp4_codes_from_packed(sd["weight_packed"])
    else:  # torch's own e4m3 cast is an independent encoder for the E4M3 grid values
        out["codes"] = out["grid"].to(torch.float8_e4m3fn).view(torch.uint8)
    return out


@pytest.mark.parametrize(
    "name,family,dtype",
    [p for n in sorted(_CT_MX) for p in sweep(("grid_ties", "pow2_neighbours", "tiny", "huge"), prefix=(n,))],
)
def test_mx_matches_ct(name: str, family: str, dtype: torch.dtype) -> None:
    x, x32 = _input(family, dtype)
    preset, bits = _CT_MX[name]
    ref = _ct_mx(x32, preset)
    fmt = get_format(name, profile="compressed_tensors")
    q = quantize(x, fmt)
    ok = torch.isfinite(ref["scale"])  # (rows, blocks); difference 2 where False
    elem_ok = ok.repeat_interleave(32, dim=-1)
    assert torch.equal(q.scales[ok], ref["scales"][ok])
    _assert_codes(q.codes[elem_ok], ref["codes"][elem_ok], ref["scaled"][elem_ok], 8 if bits == 4 else 0x80)
    assert _same(dequantize(q)[elem_ok], ref["deq"].to(dtype)[elem_ok])
    assert _same(fake_quantize(x, fmt)[elem_ok], ref["fq"].to(dtype)[elem_ok])


def test_ct_mx_scale_overflows_at_top_binade() -> None:
    """Difference 2: a block amax of 1.75 * 2^127 makes CT's MXFP4 scale Inf and its whole block NaN.

    CT `round_to_power_2` adds 2^21 to the fp32 bits of amax (0x7F600000 -> 0x7F800000 = Inf); `127 + log2(Inf) - 2`
    saturates to byte 255 and `2^(255 - 127)` is Inf, so `x / Inf * Inf` is NaN for every element. quarl's EVEN
    exponent is 255 - 127 - 2 = 126 (byte 253), as torchao EVEN: the other elements stay exact; the amax element
    itself, 1.75 * 2^127 / 2^126 = 3.5 -> 4 (RNE), dequantizes to 4 * 2^126 = 2^128, which overflows fp32 to +Inf
    (same in torchao EVEN: an fp32 limit of the dequantized value, not a saturation failure of the code).
    """
    x = torch.zeros(1, 32)
    x[0, 0] = 1.75 * 2.0**127
    x[0, 1] = 2.0**127
    ref = _ct_mx(x, "MXFP4")
    assert torch.isinf(ref["scale"]).all() and torch.isnan(ref["fq"]).all()
    q = quantize(x, "mxfp4", profile="compressed_tensors")
    assert q.scales[0, 0] == 253 and q.codes[0, 0] == 6 and q.codes[0, 1] == 4
    y = fake_quantize(x, "mxfp4", profile="compressed_tensors")
    assert y[0, 0] == float("inf") and y[0, 1] == 2.0**127 and not torch.isnan(y).any()


# ----------------------------------------------------------------------------------------------- INT / FP8 scaled
def _ct_scaled(x: torch.Tensor, args: QuantizationArgs) -> dict[str, torch.Tensor]:
    """compressed-tensors symmetric INT / FP8 on fp32 `x` (rows, cols), observer min/max as llm-compressor."""
    if args.strategy == "tensor":
        scale, zp = calculate_qparams(x.amin(), x.amax(), args)
    elif args.strategy == "channel":
        scale, zp = calculate_qparams(x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True), args)
    else:
        scale, zp = compute_dynamic_scales_and_zp(x, args, None)
    grid = ct_quantize(x, scale, zp, args)
    out = {"scale": scale, "fq": ct_fake_quantize(x, scale, zp, args), "grid": grid,
           "scaled": x / scale if args.strategy != "group" else _ct_group_scaled(x, scale)}
    out["deq"] = ct_dequantize(grid, scale, zp, args=args, dtype=torch.float32)
    if args.type == "int":
        out["codes"] = grid.to(torch.int32)
    else:
        out["codes"] = grid.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    return out


def _quarl_int_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    k = codes.to(torch.int32)
    return torch.where(k >= (1 << (bits - 1)), k - (1 << bits), k)


_SCALED_CASES = {
    # id: (quarl name, quarl options, CT QuantizationArgs kwargs)
    "int8_channel": ("int8", {"granularity": "per_channel"}, dict(num_bits=8, type="int", strategy="channel")),
    "int8_group64": ("int8", {"granularity": "per_group", "group_size": 64},
                     dict(num_bits=8, type="int", strategy="group", group_size=64)),
    "int4_channel": ("int4", {"granularity": "per_channel"}, dict(num_bits=4, type="int", strategy="channel")),
    "int4_group32": ("int4", {"granularity": "per_group", "group_size": 32},
                     dict(num_bits=4, type="int", strategy="group", group_size=32)),
    "int4_group128": ("int4", {}, dict(num_bits=4, type="int", strategy="group", group_size=128)),
    "fp8_tensor": ("fp8_e4m3", {}, dict(num_bits=8, type="float", strategy="tensor")),
    "fp8_channel": ("fp8_e4m3", {"granularity": "per_channel"}, dict(num_bits=8, type="float", strategy="channel")),
}


# default run: random, outliers, zero blocks and the power-of-two boundaries (32 x 256, milliseconds each)
_SCALED_FAST = ("normal", "outliers", "zero_blocks", "pow2_neighbours")


@pytest.mark.parametrize(
    "case,family,dtype", [p for c in sorted(_SCALED_CASES) for p in sweep(_SCALED_FAST, prefix=(c,))]
)
def test_scaled_matches_ct(case: str, family: str, dtype: torch.dtype) -> None:
    name, options, ct_kwargs = _SCALED_CASES[case]
    x, x32 = _input(family, dtype, cols=256)
    ref = _ct_scaled(x32, QuantizationArgs(symmetric=True, **ct_kwargs))
    fmt = get_format(name, **options)
    q = quantize(x, fmt)
    assert torch.equal(q.scales.reshape(ref["scale"].shape), ref["scale"])
    if name.startswith("int"):
        assert torch.equal(_quarl_int_codes(q.codes, ct_kwargs["num_bits"]), ref["codes"])
    else:
        _assert_codes(q.codes, ref["codes"], ref["scaled"], 0x80)
    assert _same(dequantize(q), ref["deq"].to(dtype))
    assert _same(fake_quantize(x, fmt), ref["fq"].to(dtype))
