"""Absmax-scaled formats: FP8 (E4M3 / E5M2) and symmetric INT8 / INT4 per compressed-tensors, NF4 per bitsandbytes.

Math, per scale group (the whole tensor, a row/token, or ``group_size`` elements along ``axis``), ``m = amax|x|``:

* FP8 (compressed-tensors 0.20 ``calculate_qparams`` + ``_quantize_dequantize``)::

      scale = m / max_normal   (448 for E4M3, 57344 for E5M2);   scale == 0 -> fp32 eps (2^-23)
      q = fp8(clamp(x / scale, +-max_normal));   y = q * scale

  compressed-tensors has no E5M2 scheme; ``fp8_e5m2`` applies the same formula with the E5M2 grid.
* INT symmetric (compressed-tensors 0.20 ``calculate_qparams``)::

      scale = m / ((qmax - qmin) / 2)   (127.5 for int8, 7.5 for int4);   scale == 0 -> 2^-23
      q = round_half_even(clamp(x / scale, qmin, qmax));   y = q * scale

  so ``+m`` maps to 127 (or 7), never to 127.5.
* NF4 (bitsandbytes 0.50.2 ``quantize_4bit``, blocksize 64)::

      n = clamp(x * reciprocal(m), -1, 1);   code = bucketize(n, midpoints)  # a tie goes to the LOWER level
      y = NF4_LEVELS[code] * m

  An all-zero block (``m = 0``) would give 0 * inf = NaN there; quarl maps it to code 7 (0.0) and ``m = 0``.

Static per-tensor scale (``tensor_scale="static"``): ``m`` is the calibrated ``global_amax`` instead of the tensor's.

Policies: a group holding NaN/Inf gets a NaN scale and dequantizes to NaN (other groups unaffected); ``-0.0`` keeps
its sign in FP8/INT (INT's integer 0 has no sign: the value is ``+-0.0`` by ``copysign`` but the code is 0);
stochastic rounding is available for FP8/INT (not NF4, whose tie rule is part of its definition).
"""

from __future__ import annotations

import torch

from .blocking import BlockQuant
from .registry import QFormat
from .rounding import round_elem
from .spec import NF4_LEVELS, FloatSpec

_FP32_EPS = torch.finfo(torch.float32).eps  # CT _get_dtype_eps(float32)


def _half_range(fmt: QFormat) -> float:
    """CT's ``bit_range / 2``: max_normal for floats, (qmax - qmin) / 2 for ints."""
    if isinstance(fmt.elem, FloatSpec):
        return fmt.elem.max_normal
    return (fmt.elem.qmax - fmt.elem.qmin) / 2


def _nan_if_nonfinite(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, float("nan")))


def dequant_scale(scales: torch.Tensor, global_scale: torch.Tensor | None, fmt: QFormat) -> torch.Tensor:
    """The stored fp32 scale is the multiplier."""
    return scales.to(torch.float32)


def quantize_blocks(xb: torch.Tensor, fmt: QFormat, noise: torch.Tensor | None,
                    global_amax: torch.Tensor | None = None) -> BlockQuant:
    """Quantize fp32 groups ``(..., n_groups, group)`` to FP8 / INT (see the module docstring).

    ``global_amax`` (per-tensor granularity only): a static, calibrated ``m`` instead of the tensor's own; the scale
    formula is unchanged (``m / max_normal``, 0 -> eps), so ``scale`` equals compressed-tensors' stored
    ``input_scale``. Elements beyond ``m`` saturate to ``+-max_normal * scale``; a NaN / Inf in the tensor still makes
    it all NaN (the tensor is the scale group).
    """
    amax = xb.abs().amax(dim=-1, keepdim=True)
    m = amax if global_amax is None else global_amax.to(torch.float32).reshape(1, 1, 1).expand_as(amax)
    scale = m / _half_range(fmt)
    scale = torch.where(scale == 0, torch.full_like(scale, _FP32_EPS), scale)
    scale = _nan_if_nonfinite(scale, amax)
    values = round_elem(xb / scale, fmt.elem, fmt.rounding, noise)
    return BlockQuant(values, scale, scale, None)


def nf4_levels(device: torch.device | None = None) -> torch.Tensor:
    """The 16 NF4 levels as an fp32 tensor (index = code)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def nf4_codes(xb: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """NF4 level index (int64) of each element of ``xb`` given its block ``amax`` (ties to the lower level)."""
    levels = nf4_levels(xb.device)
    mid = (levels[1:] + levels[:-1]) / 2
    n = (xb * amax.reciprocal()).clamp(-1.0, 1.0)
    n = torch.where(amax == 0, torch.zeros_like(n), n)  # zero block: 0 * inf would be NaN
    n = torch.nan_to_num(n, nan=0.0)  # non-finite blocks: code arbitrary (0.0), the NaN scale carries the NaN
    return torch.bucketize(n, mid, right=False)


def quantize_blocks_nf4(xb: torch.Tensor, fmt: QFormat, noise: torch.Tensor | None) -> BlockQuant:
    """Quantize fp32 blocks ``(..., n_blocks, 64)`` to NF4 (see the module docstring)."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    codes = nf4_codes(xb, amax)
    values = nf4_levels(xb.device)[codes]
    scale = _nan_if_nonfinite(amax, amax)
    return BlockQuant(values, scale, scale, None)
