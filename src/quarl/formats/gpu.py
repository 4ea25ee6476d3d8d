"""Triton kernels for MX and NVFP4 fake quantization on the GPU: one fused pass, bit-identical to the CPU reference.

Why: the eager path launches ~25 kernels per call and Inductor's generated Triton uses approximate fp32 division.
These kernels transcribe ``native_source.py`` (itself a transcription of the eager numerics) with the same bit
tricks, and make every rounding explicit:

* division: ``tl.math.div_rn`` (IEEE round-to-nearest; Triton's ``/`` is ``div.full.f32``, up to 2 ulp off);
* no FMA contraction (``enable_fp_fusion=False``), as the CPU kernel's ``-ffp-contract=off``;
* RNE to an integer: ``(t + 2^23) - 2^23`` for ``0 <= t < 2^23`` (exact in fp32, no FMA involved; every ``t`` here
  is below 2^8); half-away: ``floor(t + 0.5)`` as a truncating cast of a non-negative value;
* powers of two are built from exponent bits; amax is an integer max of the sign-cleared bits.

Coverage: what ``native.serves`` covers, for CUDA (or CPU under ``TRITON_INTERPRET=1``) tensors whose last dim is a
multiple of ``block_size`` (full blocks only; otherwise None and the caller uses eager). NVFP4 takes the per-tensor
amax with torch (``nvfp4.tensor_amax``); a non-finite amax under ``nonfinite="reference"`` and torchao's all-zero
0/0 go to eager, as in the native kernel.

Tests: tests/formats/test_gpu.py runs these kernels in Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set
before triton is imported) against ``fake_quantize_eager`` on the adversarial sets; the ``gpu``-marked test does
the same on CUDA. ``benchmarks/rollout.py`` prints the achieved fraction of HBM bandwidth on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from .native import _mx_args, _nv_args, serves
from .registry import Family, NonFinite, Profile, QFormat, RoundingMode, TensorScale

BLOCKS_PER_PROGRAM = 64
ENV_SWITCH = "QUARL_TRITON"


@functools.lru_cache(maxsize=1)
def kernels():
    """(mx_kernel, nvfp4_kernel) from ``gpu_kernels`` (compiled lazily by Triton); ImportError without triton.

    ``kernels.cache_clear()`` plus a reload of ``gpu_kernels`` switches to/from ``TRITON_INTERPRET=1``.
    """
    from . import gpu_kernels

    return gpu_kernels.mx_kernel, gpu_kernels.nvfp4_kernel


def fake_quantize(x: torch.Tensor, fmt: QFormat) -> torch.Tensor | None:
    """fp32 fake-quantized ``x`` from the Triton kernels, or None when they do not serve this call.

    Args:
        x: float tensor on CUDA (or CPU under ``TRITON_INTERPRET=1``), last dim a multiple of ``fmt.block_size``.
        fmt: an MX or NVFP4 format (see ``native.serves``); blocks along the last dim.

    Returns:
        fp32 tensor, bit-identical to ``fake_quantize_eager(x, fmt)``; None when not served.
    """
    if not serves(fmt) or x.dim() == 0 or x.numel() == 0 or x.shape[-1] % fmt.block_size:
        return None
    if fmt.tensor_scale is not TensorScale.DYNAMIC or fmt.profile is Profile.VLLM:  # not in the Triton kernels
        return None
    if fmt.axis not in (-1, x.dim() - 1):
        return None
    mx_kernel, nv_kernel = kernels()
    x32 = x.to(torch.float32).contiguous()
    y = torch.empty_like(x32)
    n_blocks = x32.numel() // fmt.block_size
    grid = (-(-n_blocks // BLOCKS_PER_PROGRAM),)
    half_away = fmt.rounding is RoundingMode.HALF_AWAY
    if fmt.family is Family.MX:
        block, mode, even_mbits, p, rcp, is_int, mbits, emin, maxn, step, lo, hi, _ = _mx_args(fmt)
        mx_kernel[grid](x32, y, n_blocks, BLOCK=block, BPP=BLOCKS_PER_PROGRAM, MODE=mode, EVEN_MBITS=even_mbits,
                        P=p, RCP_MAX=float(torch.tensor(rcp, dtype=torch.float32)), IS_INT=bool(is_int),
                        MBITS=mbits, EMIN=emin, MAXN=maxn, STEP=step, LO=lo, HI=hi, HALF_AWAY=half_away,
                        enable_fp_fusion=False)
        return y
    constants = _constants(x32, fmt)
    if constants is None:
        return None
    block, profile, _ = _nv_args(fmt)
    nv_kernel[grid](x32, y, constants, n_blocks, BLOCK=block, BPP=BLOCKS_PER_PROGRAM, PROFILE=profile,
                    HALF_AWAY=half_away, enable_fp_fusion=False)
    return y


def _constants(x32: torch.Tensor, fmt: QFormat) -> torch.Tensor | None:
    """fp32 [T, g, h, 1/2688] for the NVFP4 kernel, computed with the eager path's own torch ops; None for the
    inputs eager must decide (a non-finite T under the reference policy, torchao's pts = 0 or 1/pts = Inf)."""
    from .nvfp4 import _FP32_TINY, _RANGE, _te_senc, tensor_amax

    block_local = fmt.nonfinite is NonFinite.BLOCK
    T = tensor_amax(x32, block_local)
    if not block_local and not bool(torch.isfinite(T)):
        return None
    if fmt.profile is Profile.COMPRESSED_TENSORS:
        g = torch.nan_to_num(T.clamp(min=_FP32_TINY).reciprocal() * _RANGE, nan=1.0, posinf=1.0, neginf=1.0)
        h = torch.ones_like(T)
    elif fmt.profile is Profile.TORCHAO:
        g = T / _RANGE
        h = g.reciprocal()
        if not bool((g > 0) & torch.isfinite(h)):
            return None
    else:
        s_enc = _te_senc(T)
        g = s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32, device=T.device)
        h = torch.ones_like(T) / s_enc
    c = torch.tensor(1.0 / _RANGE, dtype=torch.float32, device=T.device).reshape(1)
    return torch.cat([T, g, h, c]).to(torch.float32)


def try_fake_quantize(x: torch.Tensor, fmt: QFormat, global_amax: torch.Tensor | None) -> torch.Tensor | None:
    """The Triton path inside ``fake_quantize`` for CUDA tensors: opt-in (``QUARL_TRITON=1``) until
    tests/formats/test_gpu.py's ``gpu`` test has run on hardware (the interpreter checks the logic, not the
    device's arithmetic); None when off, without triton, with a static ``global_amax``, or not served."""
    if os.environ.get(ENV_SWITCH) != "1" or global_amax is not None:
        return None
    try:
        return fake_quantize(x, fmt)
    except ImportError:
        return None


def peak_bandwidth(device: torch.device) -> float:
    """Theoretical memory bandwidth of a CUDA device in bytes/s (memory clock x bus width x 2, DDR)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return 4.8e12  # H200 HBM3e when the properties are unavailable
    return clock_khz * 1e3 * bus_bits / 8 * 2
