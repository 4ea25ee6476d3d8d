"""OCP Microscaling (MX) block quantization: one E8M0 power-of-two scale per 32 elements.

Formats: mxfp4 (E2M1), mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxfp8_e5m2, mxint8 (k/64, k in [-127, 127]).

Math (OCP MX v1.0 §6.3; microxcaling's and torchao's MX paths), per block of ``block_size`` elements along ``axis``:

1. ``amax = max |x|`` (fp32).
2. Unbiased scale exponent ``s`` from the fp32 *bits* of ``amax`` per :class:`ScaleMode` (never ``log2``, which is not
   exact near powers of two: float32 ``log2(nextbelow(8.0))`` rounds to 3.0), clamped to [-127, 127]; stored biased as
   the E8M0 byte ``s + 127``. All-zero blocks get ``s = -127`` (byte 0, scale 2^-127), as in microxcaling and torchao.
3. ``a = x * 2^-s``; ``2^-s`` is built exactly from bits, so this equals torchao main's ``data * reciprocal(2^s)`` and
   compressed-tensors' ``x / 2^s``. 2^-127 is the fp32 subnormal 0x00400000, never 2^-126 (torchao 0.18's clamp).
4. Element rounding (``rounding``): RNE by default; saturating to +-max_normal.
5. Dequantization: ``value * 2^s`` (exact).

Policies:
* Non-finite input: NaN or +-Inf anywhere in a block gives the E8M0 NaN byte 255, so the whole block dequantizes to
  NaN (OCP §5.2, torchao main, microxcaling). Other blocks are unaffected. Deliberately not reproduced: torchao 0.18's
  byte 253 for Inf.
* ``-0.0`` keeps its sign (code with the sign bit set, value ``-0.0``), as torchao; microxcaling / compressed-tensors
  return ``+0.0`` there (equal under ``==``).
* ``profile="compressed_tensors"`` reproduces compressed-tensors 0.20 ``generate_mx_scales``: EVEN rounding of amax with a
  fixed mantissa width (1 for mxfp4/mxfp8_e4m3, 3 for mxfp6_e2m3), so CT's MXFP8 differs from torchao EVEN
  (threshold 1.75 vs 1.9375 for E4M3). CT's NaN handling (an undefined uint8 cast) is not reproduced: the NaN policy
  above applies.
* Not reproduced: microxcaling's float32 ``log2`` exponent (its python path; its C++ kernels take bits, as we do) and
  its half-away default (available as ``rounding="half_away"``); torchao 0.18 RCEIL via ``log2`` and its 2^-126
  clamp (docs/formats.md lists every difference between the references).
"""

from __future__ import annotations

import torch

from .blocking import BlockQuant
from .registry import Profile, QFormat, ScaleMode
from .rounding import F32_BIAS, F32_MBITS, exp2_int, round_elem
from .spec import E2M3, E8M0_BIAS, E8M0_NAN, FloatSpec, IntSpec


def _target_pow2(elem: FloatSpec | IntSpec) -> int:
    """``P``: exponent of the element grid's largest power of two (2 fp4/e2m3, 4 e3m2, 8 e4m3, 15 e5m2, 0 int8)."""
    if isinstance(elem, FloatSpec):
        return elem.emax
    return 0  # microxcaling emax for int8: amax in [1, 2) * 2^s maps to [1, 2) on the k/64 grid


def _even_mbits(fmt: QFormat) -> int:
    """Mantissa width whose RNE overflow bumps the EVEN exponent (CT fixes it to 1, or 3 for E2M3)."""
    if fmt.profile is Profile.COMPRESSED_TENSORS:
        return 3 if fmt.elem == E2M3 else 1
    if isinstance(fmt.elem, FloatSpec):
        return fmt.elem.mbits
    return 6  # k/64 with |k| <= 127: 1.111111b is the largest in-binade magnitude


def scale_exponent(amax: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """E8M0 byte (uint8) for each block amax per ``fmt.scale_mode``; non-finite amax -> 255 (NaN).

    Args:
        amax: fp32 tensor of block maxima (>= 0 or NaN).
        fmt: an MX format.

    Returns:
        uint8 tensor, same shape.
    """
    elem = fmt.elem
    if fmt.scale_mode is ScaleMode.RCEIL:
        y = amax * (1.0 / elem.max_normal)
        bits = y.view(torch.int32)
        be = (bits >> F32_MBITS) & 0xFF
        mant_nonzero = (bits & 0x7FFFFF) != 0
        # ceil(log2 y) + 127 = be + (mantissa != 0) for normal y. Subnormal y: byte 0 (2^-127) when y <= 2^-127
        # (bits <= 0x00400000), else byte 1 -- the exact ceiling, as torchao main's boundary table.
        sub_byte = (bits > 0x00400000).to(torch.int32)
        biased = torch.where(be == 0, sub_byte, be + mant_nonzero.to(torch.int32))
        biased = biased.clamp(0, 254)  # finite y > 2^127 (only mxint8 near fp32 max): saturate, not NaN
    else:
        bits = amax.view(torch.int32)
        if fmt.scale_mode is ScaleMode.EVEN:
            bits = (bits + (1 << (22 - _even_mbits(fmt)))) & (0x1FF << F32_MBITS)
        s = ((bits >> F32_MBITS) & 0xFF) - F32_BIAS - _target_pow2(elem)
        if fmt.scale_mode is ScaleMode.CEIL:
            s = s + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        biased = s.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    biased = torch.where(torch.isfinite(amax), biased, torch.full_like(biased, E8M0_NAN))
    return biased.to(torch.uint8)


def dequant_scale(scales: torch.Tensor, global_scale: torch.Tensor | None, fmt: QFormat) -> torch.Tensor:
    """fp32 multiplier ``2^(b - 127)`` from stored E8M0 bytes (255 -> NaN)."""
    b = scales.to(torch.int32)
    dq = exp2_int(b - E8M0_BIAS)
    return torch.where(b == E8M0_NAN, torch.full_like(dq, float("nan")), dq)


def quantize_blocks(xb: torch.Tensor, fmt: QFormat, noise: torch.Tensor | None) -> BlockQuant:
    """Quantize fp32 blocks ``(..., n_blocks, block)`` to MX (see the module docstring for the math)."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    byte = scale_exponent(amax, fmt)
    s = byte.to(torch.int32) - E8M0_BIAS
    a = xb * exp2_int(-s)  # exact power-of-two scaling (NaN blocks: s = 128 -> factor 2^-128, masked by dq below)
    values = round_elem(a, fmt.elem, fmt.rounding, noise)
    dq = dequant_scale(byte, None, fmt)
    return BlockQuant(values, dq, byte, None)
