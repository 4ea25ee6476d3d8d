"""Rounding of fp32 values onto an element grid (FloatSpec / IntSpec), bit-exact and saturating.

Why: the element cast is where references disagree (microxcaling's "nearest" rounds half *away*
from zero, everyone else rounds half to even). One function, one enum, no ambiguous "nearest".

Math (float grids): for ``a = min(|v|, max_normal)`` take the exponent from the fp32 bits,
``e = max(floor(log2 a), emin)`` (never ``torch.log2``, which is not exact near powers of two), then ``a * 2^(mbits-e)``
is an exact fp32 number whose integer part indexes the grid step ``2^(e-mbits)``. Rounding it to an integer ``r`` and
scaling back, ``r * 2^(e-mbits)``, is exact (powers of two, no overflow). A carry (``r == 2^(mbits+1)``) lands on the
next binade's first value, which is on the grid. Saturation: magnitudes ``>= max_normal`` (including +-Inf) become
``max_normal`` ("satfinite", as the OCP MX spec, torchao ``_f32_to_floatx_unpacked`` and PTX ``cvt.rn.satfinite``); NaN
stays NaN. The sign is re-applied with ``copysign``, so ``-0.0`` and tiny negatives that round to zero give ``-0.0``.
No native float8 cast is used, so results do not depend on the torch version (eager ``.to(torch.float8_e4m3fn)``
saturates only since torch 2.13); tests/formats/test_codes.py checks equality with the native
casts on this torch.

Integer grids: ``r = round(v / step)`` clamped to ``[qmin, qmax]`` (compressed-tensors ``round_to_quantized_type_args``);
an integer zero is always ``+0.0`` (its code has no sign).

References: OCP MX v1.0 §5.3/§6.3; microxcaling ``mx/elemwise_ops.py::_round_mantissa``; torchao
``prototype/custom_fp_utils.py``.
"""

from __future__ import annotations

from enum import Enum

import torch

from .spec import F32_BIAS, F32_MBITS, FloatSpec, IntSpec


class RoundingMode(str, Enum):
    """How an element is rounded onto its grid (``q`` = grid step at the value, ``t = |v| / q``)."""

    NEAREST_EVEN = "rne"
    """``round(t)`` with ties to the even integer (IEEE RNE; torchao, compressed-tensors, TE, PTX ``cvt.rn``)."""
    HALF_AWAY = "half_away"
    """``floor(t + 0.5)``: ties away from zero (microxcaling's ``RoundingMode.nearest``, its default)."""
    STOCHASTIC = "stochastic"
    """``floor(t + u)``, ``u ~ U[0, 1)`` from a seeded ``torch.Generator``: unbiased, ``E[round(t)] = t``."""


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2^k`` for an int32 tensor ``k`` in [-126, 127], built from the exponent bits."""
    return ((k + F32_BIAS) << F32_MBITS).view(torch.float32)


def floor_log2_bits(a: torch.Tensor) -> torch.Tensor:
    """Unbiased fp32 exponent field of ``a`` (int32): floor(log2|a|) for normals, -127 for zero/subnormals."""
    return ((a.view(torch.int32) >> F32_MBITS) & 0xFF) - F32_BIAS


def _round_integer(t: torch.Tensor, mode: RoundingMode, noise: torch.Tensor | None) -> torch.Tensor:
    """Round non-negative ``t`` to an integer per ``mode`` (``noise`` = U[0,1) samples for STOCHASTIC)."""
    if mode is RoundingMode.NEAREST_EVEN:
        return torch.round(t)
    if mode is RoundingMode.HALF_AWAY:
        return torch.floor(t + 0.5)
    if noise is None:
        raise ValueError("stochastic rounding needs uniform noise (pass a generator or a seed)")
    return torch.floor(t + noise)


def round_to_float_grid(
    v: torch.Tensor, spec: FloatSpec, mode: RoundingMode = RoundingMode.NEAREST_EVEN,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round fp32 ``v`` to the nearest value of ``spec`` (saturating; NaN propagates; sign of zero kept).

    Args:
        v: fp32 tensor, already divided by its block scale.
        spec: element grid.
        mode: tie/rounding rule.
        noise: U[0,1) fp32 tensor shaped like ``v`` (only for ``RoundingMode.STOCHASTIC``).

    Returns:
        fp32 tensor of grid values, same shape as ``v``.
    """
    a = v.abs().clamp(max=spec.max_normal)
    e = floor_log2_bits(a).clamp(min=spec.emin)
    k = spec.mbits - e
    r = _round_integer(a * pow2(k), mode, noise)
    return torch.copysign(r * pow2(-k), v)


def round_to_int_grid(
    v: torch.Tensor, spec: IntSpec, mode: RoundingMode = RoundingMode.NEAREST_EVEN,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round fp32 ``v`` to ``step * [qmin, qmax]`` (clamp first, as compressed-tensors does; NaN propagates).

    Args:
        v: fp32 tensor, already divided by its scale.
        spec: integer grid.
        mode: tie/rounding rule (applied to ``|v|``, sign restored, so HALF_AWAY is symmetric).
        noise: U[0,1) samples for ``RoundingMode.STOCHASTIC``.

    Returns:
        fp32 tensor of grid values.
    """
    t = v.clamp(spec.qmin * spec.step, spec.qmax * spec.step)
    if spec.step != 1.0:
        t = t * (1.0 / spec.step)  # exact: step is a power of two
    r = torch.copysign(_round_integer(t.abs(), mode, noise), t)
    r = torch.where(r == 0, torch.zeros_like(r), r)  # integers have no -0: zero is +0.0, matching its code 0
    return r * spec.step if spec.step != 1.0 else r


def exp2_int(k: torch.Tensor) -> torch.Tensor:
    """Exact fp32 ``2^k`` for int32 ``k`` in [-149, 127], including fp32 subnormals (2^-127 = 0x00400000)."""
    normal = ((k.clamp(min=-126) + F32_BIAS) << F32_MBITS)
    subnormal = torch.ones_like(k) << (k + 149).clamp(0, 22)
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def round_elem(
    v: torch.Tensor, elem: FloatSpec | IntSpec, mode: RoundingMode, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Round onto a float or integer element grid (dispatch on the spec type)."""
    if isinstance(elem, FloatSpec):
        return round_to_float_grid(v, elem, mode, noise)
    return round_to_int_grid(v, elem, mode, noise)
