"""Cross-check `quarl.formats` against torchao 0.18.0 itself (MX FLOOR / RCEIL, NVFP4, fp4 packing), bit for bit.

Run: pytest tests/formats/test_xcheck_torchao.py -q

Reference side: `torchao.prototype.mx_formats` — `to_mx` / `to_dtype` for MX, `NVFP4Tensor.to_nvfp4` with
`per_tensor_amax_to_scale` for two-level NVFP4, `pack_uint4` / `unpack_uint4` for packing. Every comparison is exact
(`torch.equal`, NaN positions included); no ulp tolerance is needed.

quarl's MX profile targets torchao MAIN where 0.18.0 has documented bugs (docs/formats.md). Those inputs are excluded
from the 0.18.0 equality — exactly the blocks that trigger each bug — and each bug has a test that shows it:

1. FLOOR 2^-126 clamp: 0.18 stores byte 0 (2^-127) but divides by 2^-126, so nonzero blocks with byte 0 come back at
   half value. Excluded: blocks with 0.18 byte 0 and amax > 0. (`test_018_floor_denormal_clamp_bug`)
2. RCEIL via float32 `log2` (and reciprocal 1.0 for byte 0): excluded are the blocks whose 0.18 byte differs from
   main's bit-exact byte, or whose byte is 0 with amax > 0. (`test_018_rceil_log2_bug`)
3. Inf -> byte 253 (FLOOR): non-finite inputs are not in the equality sets (`test_018_inf_amax_byte`).

Inputs: the finite families of `_adversarial.py` in fp32 and bf16; the default run takes the edge-case families,
`-m slow` the full sweep.

To cover the excluded blocks too, `_ao_main_mx` rebuilds torchao MAIN's MX path (scale rules transcribed from
pytorch/ao main `mx_tensor.py::_f32_to_e8m0_rceil`, `_e8m0_scale_to_reciprocal_fp32`, `to_mx`) around torchao
0.18.0's own element casts and `to_dtype`; quarl must equal it on every finite block. The transcription itself is
pinned by torchao main's own boundary table (`test_main_rceil_transcription_matches_torchao_table`).
"""

from __future__ import annotations

import pytest
import torch
from _adversarial import FINITE, sweep
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.prototype.mx_formats.kernels import (
    f32_to_f4_unpacked,
    f32_to_f6_e2m3_unpacked,
    f32_to_f6_e3m2_unpacked,
    pack_uint4,
    unpack_uint4,
)
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

from quarl.formats import dequantize, fake_quantize, get_format, pack_fp4, quantize, unpack_fp4

_FLOOR, _RCEIL = ScaleCalculationMode.FLOOR, ScaleCalculationMode.RCEIL

# quarl name -> (torchao elem_dtype, max_pos, P = torchao *_MAX_POW2, element cast (fp32 -> codes))
_MX = {
    "mxfp4": (torch.float4_e2m1fn_x2, 6.0, 2, f32_to_f4_unpacked),
    "mxfp6_e2m3": ("fp6_e2m3", 7.5, 2, f32_to_f6_e2m3_unpacked),
    "mxfp6_e3m2": ("fp6_e3m2", 28.0, 4, f32_to_f6_e3m2_unpacked),
    "mxfp8_e4m3": (torch.float8_e4m3fn, 448.0, 8, lambda d: d.to(torch.float8_e4m3fn).view(torch.uint8)),
    "mxfp8_e5m2": (torch.float8_e5m2, 57344.0, 15,
                   lambda d: d.clamp(-57344.0, 57344.0).to(torch.float8_e5m2).view(torch.uint8)),
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN == NaN, same shape and dtype (the sign of zero is not compared)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _codes_from_lp(name: str, data_lp: torch.Tensor) -> torch.Tensor:
    if name == "mxfp4":
        return unpack_uint4(data_lp)
    return data_lp.view(torch.uint8) if data_lp.dtype != torch.uint8 else data_lp


def _ao_018_mx(x: torch.Tensor, name: str, mode: ScaleCalculationMode) -> dict[str, torch.Tensor]:
    """torchao 0.18.0 `to_mx` + `to_dtype` (fp32 out)."""
    elem = _MX[name][0]
    scale, data_lp = to_mx(x, elem, 32, mode)
    return {"scales": scale.view(torch.uint8), "codes": _codes_from_lp(name, data_lp),
            "deq": to_dtype(data_lp, scale, elem, 32, torch.float32)}


def _main_rceil_byte(descale: torch.Tensor) -> torch.Tensor:
    """torchao main `_f32_to_e8m0_rceil`: round fp32 up to a power of two, from the bits (transcription)."""
    bits = descale.view(torch.int32)
    be = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # normals round up on any mantissa bit; subnormals only above 2^-127 (= E8M0 byte 0, bits 0x00400000)
    up = torch.where(be == 0, mant > 0x400000, mant != 0)
    byte = be + up.to(torch.int32)
    return torch.where(torch.isfinite(descale), byte, 255).to(torch.uint8)


def _main_reciprocal(byte: torch.Tensor) -> torch.Tensor:
    """torchao main `_e8m0_scale_to_reciprocal_fp32`: exact 2^(127 - b); b = 254 -> 2^-127; b = 255 -> NaN."""
    rb = (254 - byte.to(torch.int32)) & 0xFF
    bits = torch.where(rb == 0, 0x00400000, rb << 23)
    bits = torch.where(rb == 255, 0x7F800001, bits)
    return bits.view(torch.float32)


def _ao_main_mx(x: torch.Tensor, name: str, mode: ScaleCalculationMode) -> dict[str, torch.Tensor]:
    """torchao MAIN MX semantics: main's scale rules + exact reciprocal, 0.18.0's element casts and `to_dtype`."""
    elem, max_pos, p, cast = _MX[name]
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    if mode == _RCEIL:
        byte = _main_rceil_byte(amax * (1.0 / max_pos))
    else:
        s = ((amax.view(torch.int32) >> 23) & 0xFF) - 127 - p
        byte = (s.clamp(-127, 128) + 127).to(torch.uint8)
        byte = torch.where(torch.isfinite(amax), byte, torch.full_like(byte, 255))
    codes = cast(blocks * _main_reciprocal(byte)).reshape(x.shape)
    scale = byte.squeeze(-1).view(torch.float8_e8m0fnu)
    data_lp = pack_uint4(codes) if name == "mxfp4" else codes
    if name in ("mxfp8_e4m3", "mxfp8_e5m2"):
        data_lp = data_lp.view(elem)
    return {"scales": byte.squeeze(-1), "codes": codes, "deq": to_dtype(data_lp, scale, elem, 32, torch.float32)}


def _018_buggy_blocks(x: torch.Tensor, ref: dict, name: str, mode: ScaleCalculationMode) -> torch.Tensor:
    """(rows, blocks) mask of the blocks that hit a documented torchao 0.18 bug (module docstring, 1 and 2)."""
    amax = x.float().reshape(*x.shape[:-1], -1, 32).abs().amax(-1)
    bad = (ref["scales"] == 0) & (amax > 0)
    if mode == _RCEIL:
        bad |= ref["scales"] != _main_rceil_byte(amax * (1.0 / _MX[name][1]))
    return bad


def _input(family: str, dtype: torch.dtype) -> torch.Tensor:
    return FINITE[family](rows=32, cols=128, seed=2).to(dtype)


def _mx_params() -> list:
    """mxfp4 / mxfp8_e4m3: the edge families by default; the other elements: scale boundaries and subnormals."""
    params = []
    for name in sorted(_MX):
        wide = name in ("mxfp4", "mxfp8_e4m3")
        fast = ("grid_ties", "pow2_neighbours", "tiny", "zero_blocks") if wide else ("pow2_neighbours", "tiny")
        for mode in (_FLOOR, _RCEIL):
            params += sweep(fast, ("normal",) if wide else (), prefix=(name, mode))
    return params


@pytest.mark.parametrize("name,mode,family,dtype", _mx_params())
def test_mx_matches_torchao(name: str, mode: ScaleCalculationMode, family: str, dtype: torch.dtype) -> None:
    x = _input(family, dtype)
    fmt = get_format(name, scale_mode=mode.value)
    q = quantize(x, fmt)
    deq, fq = dequantize(q), fake_quantize(x, fmt)
    # torchao main semantics: every block
    main = _ao_main_mx(x, name, mode)
    assert torch.equal(q.scales, main["scales"])
    assert torch.equal(q.codes, main["codes"])
    assert _same(deq, main["deq"].to(dtype)) and _same(fq, main["deq"].to(dtype))
    # torchao 0.18.0 itself: every block but the documented-bug ones
    old = _ao_018_mx(x, name, mode)
    ok = ~_018_buggy_blocks(x, old, name, mode)
    elem_ok = ok.repeat_interleave(32, dim=-1)
    assert torch.equal(q.scales[ok], old["scales"][ok])
    assert torch.equal(q.codes[elem_ok], old["codes"][elem_ok])
    assert _same(deq[elem_ok], old["deq"].to(dtype)[elem_ok]) and _same(fq[elem_ok], old["deq"].to(dtype)[elem_ok])


# torchao main's own boundary table (pytorch/ao torchao/testing/_mxfp8_test_utils.py::make_f32_to_e8m0_rceil_cases)
_RCEIL_TABLE = [
    (0x00000000, 0), (0x00000001, 0), (0x00400000, 0), (0x00400001, 1), (0x007FFFFF, 1), (0x00800000, 1),
    (0x1F800000, 63), (0x1F800001, 64), (0x3F7FFFFF, 127), (0x3F800000, 127), (0x3F800001, 128),
    (0x5F800000, 191), (0x5F800001, 192), (0x7F000000, 254), (0x7F000001, 255), (0x7F7FFFFF, 255),
    (0x7F800000, 255), (0x7FC00000, 255),
]


def test_main_rceil_transcription_matches_torchao_table() -> None:
    values = torch.tensor([v for v, _ in _RCEIL_TABLE], dtype=torch.int32).view(torch.float32)
    expected = torch.tensor([b for _, b in _RCEIL_TABLE], dtype=torch.uint8)
    assert torch.equal(_main_rceil_byte(values), expected)


def test_rceil_subnormal_descale_byte() -> None:
    """RCEIL when amax/6 is an fp32 subnormal <= 2^-127: torchao main (and PTX cvt.rp.ue8m0) give byte 0 (2^-127).

    amax = 6 * 2^-128: descale = 2^-128 <= 2^-127 (= E8M0 byte 0), so the power-of-two ceiling is byte 0 and the
    block scales by 2^127: amax -> 3.0 (code 5), 2^-128 -> 0.5 (code 1), which dequantizes exactly. Byte 1 (2^-126)
    would round 2^-128 -> 0.25 -> 0 (RNE tie) and lose it.
    """
    x = torch.zeros(1, 32)
    x[0, 0] = 6 * 2.0**-128
    x[0, 1] = 2.0**-128
    main = _ao_main_mx(x, "mxfp4", _RCEIL)
    assert main["scales"][0, 0] == 0 and main["deq"][0, 1] == 2.0**-128
    q = quantize(x, "mxfp4", scale_mode="rceil")
    assert q.scales[0, 0] == 0
    assert q.codes[0, 0] == 5 and q.codes[0, 1] == 1
    assert dequantize(q)[0, 1] == 2.0**-128


def test_018_floor_denormal_clamp_bug() -> None:
    """docs/formats.md hand check `mx_fp32_denormal_range`: amax 1.5 * 2^-125 -> byte 0; 0.18 dequantizes to amax/2,
    quarl exact."""
    x = torch.zeros(1, 32)
    x[0, 0] = 1.5 * 2.0**-125
    old = _ao_018_mx(x, "mxfp4", _FLOOR)
    q = quantize(x, "mxfp4")
    assert old["scales"][0, 0] == 0 and q.scales[0, 0] == 0
    assert old["deq"][0, 0] == x[0, 0] / 2  # 0.18: x / 2^-126 = 3 -> 3 * 2^-127
    assert dequantize(q)[0, 0] == x[0, 0]  # main / quarl: x * 2^127 = 6 -> 6 * 2^-127


def test_018_rceil_log2_bug() -> None:
    """Hand check `mx_rceil_log2`: amax 96.0000076: 0.18 log2 RCEIL -> 2^4 (byte 131), main/quarl -> 2^5 (132)."""
    x = torch.zeros(1, 32)
    x[0, 0] = 96.0000076
    x[0, 1] = 8.0
    old = _ao_018_mx(x, "mxfp4", _RCEIL)
    q = quantize(x, "mxfp4", scale_mode="rceil")
    assert old["scales"][0, 0] == 131 and q.scales[0, 0] == 132
    assert old["deq"][0, 0] == 96.0 and dequantize(q)[0, 0] == 96.0  # 6 (saturated) * 16 vs 3 * 32
    assert old["deq"][0, 1] == 8.0 and dequantize(q)[0, 1] == 0.0  # 8/16 = 0.5 vs 8/32 = 0.25 -> 0 (RNE tie)


@pytest.mark.parametrize("mode,byte", [(_FLOOR, 253), (_RCEIL, 254)], ids=["floor", "rceil"])
def test_018_inf_amax_byte(mode: ScaleCalculationMode, byte: int) -> None:
    """docs/formats.md difference 5: 0.18 gives Inf blocks byte 253 (FLOOR) / 254 (RCEIL); main and quarl give 255
    (NaN)."""
    x = torch.ones(1, 32)
    x[0, 0] = float("inf")
    old = _ao_018_mx(x, "mxfp4", mode)
    q = quantize(x, "mxfp4", scale_mode=mode.value)
    assert old["scales"][0, 0] == byte and q.scales[0, 0] == 255
    assert torch.isnan(dequantize(q)).all()
    assert not torch.isnan(old["deq"][0, 1:]).any()


# ----------------------------------------------------------------------------------------------- NVFP4 (torchao)
def _ao_nvfp4(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchao two-level NVFP4 with a dynamic per-tensor scale (`per_tensor_amax_to_scale(amax)`)."""
    pts = per_tensor_amax_to_scale(x.abs().amax())
    t = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts)
    return {"pts": pts, "scales": t.scale.view(torch.uint8), "packed": t.qdata.view(torch.uint8),
            "codes": unpack_uint4(t.qdata.view(torch.uint8)), "deq": t.dequantize(torch.float32)}


@pytest.mark.parametrize(
    "family,dtype", sweep(("normal", "nv_ties", "pow2_neighbours", "tiny", "all_zero", "outliers", "zero_blocks"))
)
def test_nvfp4_matches_torchao(family: str, dtype: torch.dtype) -> None:
    """All finite families, including the all-zero tensor (NaN in both, reproduced on purpose, docs/formats.md
    difference 7).

    Codes are compared where the block scale is not NaN: inside a NaN block torchao's codes are whatever its fp4
    cast makes of NaN (no special case) and quarl stores 0; both blocks dequantize to NaN.
    """
    x = _input(family, dtype)
    ref = _ao_nvfp4(x)
    fmt = get_format("nvfp4", profile="torchao")
    q = quantize(x, fmt)
    assert _same(q.global_scale, ref["pts"].reshape(1))
    assert torch.equal(q.scales.view(torch.uint8), ref["scales"])
    finite_block = ~torch.isnan(q.scales.float()).repeat_interleave(16, dim=-1)
    assert torch.equal(q.codes[finite_block], ref["codes"][finite_block])
    assert _same(dequantize(q), ref["deq"].to(dtype))
    assert _same(fake_quantize(x, fmt), ref["deq"].to(dtype))


def test_nvfp4_torchao_tiny_block_clamp() -> None:
    """docs/formats.md difference 6 `nv_tiny_block`: torchao clamps the E4M3 block scale at 2^-6 (never subnormal), CT
    does not."""
    x = torch.zeros(1, 32)
    x[0, 0] = 2688.0  # pts = 1
    x[0, 16] = 6 * 2.0**-8  # block 1: scale 2^-8 wanted, an E4M3 subnormal
    ref = _ao_nvfp4(x)
    q = quantize(x, "nvfp4", profile="torchao")
    assert ref["scales"][0, 1] == q.scales.view(torch.uint8)[0, 1] == 0x08  # 2^-6, the smallest E4M3 normal
    assert ref["deq"][0, 16] == dequantize(q)[0, 16] == 1.5 * 2.0**-6  # 0.09375 -> 1.5 (E2M1) * 2^-6
    ct = quantize(x, "nvfp4", profile="compressed_tensors")
    assert ct.scales.view(torch.uint8)[0, 1] == 0x02  # 2^-8 = E4M3 subnormal 2/8 * 2^-6


# ----------------------------------------------------------------------------------------------- fp4 packing
def test_pack_fp4_matches_torchao() -> None:
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(pack_fp4(codes), pack_uint4(codes))
    assert torch.equal(unpack_fp4(pack_uint4(codes)), unpack_uint4(pack_uint4(codes)))
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    q = quantize(FINITE["normal"](rows=4, cols=64, seed=5), "mxfp4")
    _, data_lp = to_mx(FINITE["normal"](rows=4, cols=64, seed=5), torch.float4_e2m1fn_x2, 32, _FLOOR)
    assert torch.equal(pack_fp4(q.codes), data_lp.view(torch.uint8))
