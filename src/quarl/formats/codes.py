"""Bit codes <-> grid values for every element grid (uint8 codes, one per element).

Why: ``quantize`` returns codes (what a kernel or checkpoint stores), ``fake_quantize`` returns values; the two must
agree exactly, so the mapping is one small, exhaustively tested module (tests/formats/test_codes.py).

Code layout:
* FloatSpec: ``sign << (ebits + mbits) | E << mbits | M`` (OCP; E2M1 code = index into [0, .5, 1, 1.5, 2, 3, 4, 6]).
  A grid value ``v`` has magnitude code ``(e - emin) * 2^mbits + |v| * 2^(mbits - e)`` with
  ``e = max(floor(log2|v|), emin)`` -- one formula for subnormals and normals. NaN values get the format's NaN code
  (E4M3 0x7F, E5M2 0x7F) or 0 where the grid has none (FP4/FP6: the block scale carries the NaN).
* IntSpec: two's complement of ``round(v / step)`` in the low ``bits`` bits (int4: 0x0-0xF).
* NF4: the level index 0..15.
"""

from __future__ import annotations

import torch

from .rounding import floor_log2_bits, pow2
from .spec import FloatSpec, IntSpec, float_code_table


def encode_float(v: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """uint8 codes of fp32 grid values ``v`` (values must already lie on the grid of ``spec``)."""
    a = v.abs()
    nan = torch.isnan(a)
    a = torch.where(nan, torch.zeros_like(a), a)
    e = floor_log2_bits(a).clamp(min=spec.emin)
    mag = (e - spec.emin) * (1 << spec.mbits) + (a * pow2(spec.mbits - e)).to(torch.int32)
    sign = torch.signbit(v).to(torch.int32) << (spec.ebits + spec.mbits)
    code = mag | sign
    if spec.has_nan:
        code = torch.where(nan, torch.full_like(code, 0x7F), code)
    else:
        code = torch.where(nan, torch.zeros_like(code), code)
    return code.to(torch.uint8)


def decode_float(codes: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """fp32 values of uint8 codes (table lookup built from the bit fields)."""
    return float_code_table(spec).to(codes.device)[codes.long()]


def encode_int(v: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """uint8 two's-complement codes (low ``spec.bits`` bits) of grid values ``v``; NaN -> 0."""
    k = torch.nan_to_num(v / spec.step, nan=0.0).to(torch.int32)
    return (k & ((1 << spec.bits) - 1)).to(torch.uint8)


def decode_int(codes: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """fp32 values of two's-complement codes."""
    k = codes.to(torch.int32)
    k = torch.where(k >= (1 << (spec.bits - 1)), k - (1 << spec.bits), k)
    return k.to(torch.float32) * spec.step


def encode(v: torch.Tensor, elem: FloatSpec | IntSpec) -> torch.Tensor:
    """Codes of grid values for a float or integer grid."""
    return encode_float(v, elem) if isinstance(elem, FloatSpec) else encode_int(v, elem)


def decode(codes: torch.Tensor, elem: FloatSpec | IntSpec) -> torch.Tensor:
    """Grid values of codes for a float or integer grid."""
    return decode_float(codes, elem) if isinstance(elem, FloatSpec) else decode_int(codes, elem)
