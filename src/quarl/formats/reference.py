"""Slow, obviously-correct reference implementations, used only by tests (tests/formats/test_reference_impl.py).

Why: the fast bit-manipulation code in ``rounding.py`` / ``mx.py`` / ``nvfp4.py`` is checked with ``torch.equal``
against code that has nothing clever in it (the torchao kernel-vs-reference and microxcaling ``all_encodings``
pattern):

* element rounding = exhaustive nearest-value search over the format's value table (from ``decode_float_code``),
  ties to the even code, magnitudes clamped to the largest finite value;
* MX scale exponents from ``math.frexp`` on the exact (double) amax, in a Python loop over blocks;
* NVFP4 scale arithmetic as scalar numpy float32 operations in a loop over blocks.

Only finite inputs, blocks along the last dim, and lengths divisible by the block size are supported.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .spec import E2M1, E4M3, FloatSpec, decode_float_code


def _grid(spec: FloatSpec) -> torch.Tensor:
    """Non-negative finite grid values in code order (index = magnitude code), fp64."""
    vals = [decode_float_code(spec, c) for c in range(1 << (spec.ebits + spec.mbits))]
    return torch.tensor([v for v in vals if math.isfinite(v)], dtype=torch.float64)


def round_lut(v: torch.Tensor, spec: FloatSpec, half_away: bool = False) -> torch.Tensor:
    """Nearest grid value by exhaustive search; ties to the even code (or away from zero); saturating."""
    grid = _grid(spec)
    a = v.double().abs().clamp(max=spec.max_normal)
    d = (a.unsqueeze(-1) - grid).abs()
    best = d.min(dim=-1, keepdim=True).values
    cand = d == best  # one or two candidates (a tie)
    idx = torch.arange(len(grid))
    if half_away:
        pick = torch.where(cand, idx, -1).max(dim=-1).values  # the larger magnitude
    else:
        pick = torch.where(cand & (idx % 2 == 0), idx, len(grid)).min(dim=-1).values
        pick = torch.where(pick == len(grid), torch.where(cand, idx, -1).max(dim=-1).values, pick)
    return torch.copysign(grid[pick], v.double()).float()


def _floor_log2(a: float) -> int:
    return math.frexp(a)[1] - 1


def mx_scale_exponent(amax: float, spec: FloatSpec, mode: str) -> int:
    """Unbiased E8M0 exponent for one block amax (``floor`` / ``ceil`` / ``even`` / ``rceil``), clamped to +-127."""
    p = _floor_log2(spec.max_normal)
    if amax == 0:
        s = -127
    elif mode == "floor":
        s = _floor_log2(amax) - p
    elif mode == "ceil":
        s = _floor_log2(amax) - p + (0 if math.frexp(amax)[0] == 0.5 else 1)
    elif mode == "even":
        mant, e = math.frexp(amax)  # amax = mant * 2^e, mant in [0.5, 1)
        bump = 2 * mant >= 2 - 2.0 ** -(spec.mbits + 1)
        s = e - 1 + int(bump) - p
    elif mode == "rceil":
        y = float(np.float32(amax) * np.float32(1.0 / spec.max_normal))
        if y == 0:
            return -127
        mant, e = math.frexp(y)
        s = e - 1 if mant == 0.5 else e  # exact ceil(log2 y); clamped to >= -127 below
    else:
        raise ValueError(mode)
    return max(-127, min(127, s))


def mx_fake_quantize(x: torch.Tensor, spec: FloatSpec, mode: str = "floor", block: int = 32,
                     half_away: bool = False) -> torch.Tensor:
    """MX fake quantization, one Python iteration per block (fp32 in, fp32 out)."""
    xb = x.float().reshape(-1, block)
    out = torch.empty_like(xb)
    for i in range(xb.shape[0]):
        amax = float(xb[i].abs().max())
        s = mx_scale_exponent(amax, spec, mode)
        a = xb[i].double() * 2.0**-s  # exact in double
        out[i] = (round_lut(a, spec, half_away).double() * 2.0**s).float()
    return out.reshape(x.shape)


def _e4m3(v: np.float32) -> np.float32:
    return np.float32(round_lut(torch.tensor([float(v)]), E4M3)[0].item())


def nvfp4_ct_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors NVFP4 fake quantization with scalar float32 arithmetic per block."""
    f32 = np.float32
    xf = x.float()
    t = f32(xf.abs().max().item())
    gs = f32(f32(1.0) / max(t, f32(np.finfo(np.float32).tiny))) * f32(2688.0)
    gs = f32(1.0) if not np.isfinite(gs) else gs
    xb = xf.reshape(-1, 16)
    out = torch.empty_like(xb)
    for i in range(xb.shape[0]):
        row = xb[i].numpy()
        b = f32(np.abs(row).max())
        s8 = _e4m3(min(gs * (b / f32(6.0)), f32(448.0)))
        s8 = f32(0.125) if s8 == 0 else s8
        eff = f32(s8 / gs)
        a = torch.from_numpy((row / eff).astype(np.float32))
        out[i] = torch.from_numpy((round_lut(a, E2M1).numpy() * eff).astype(np.float32))
    return out.reshape(x.shape)
