"""``fake_quantize``: quantize-dequantize in the input dtype, with ONE straight-through-estimator autograd.Function.

Why: training through emulated low-bit numerics needs a gradient. Hand-rolled W4A4 RL runs stayed at 7-10% GSM8K
because activation fake-quant ran under ``no_grad`` without an STE (docs/failure-modes.md). The forward is exactly
``dequantize(quantize(x))`` (bit for bit, fp32 compute, result in ``x.dtype``); the backward is

* ``ste="identity"``: ``dL/dx = dL/dy``;
* ``ste="clipped"``:  ``dL/dx = dL/dy * [|x| <= elem_max * dq]``, zero where ``x`` saturated (``dq`` = the block's
  dequantization multiplier; e.g. MX FLOOR's [6, 8) * 2^s band for FP4).

When no gradient is needed (``torch.no_grad`` or ``x.requires_grad == False``) the autograd.Function is skipped, so
no graph is built. Paths, all bit-identical to ``fake_quantize_eager``: MX and NVFP4 on CPU run the native C kernel
(``native.py``; built once per machine, ~0.5 s; eager fallback without a compiler; ``QUARL_NATIVE=0`` turns it
off), on CUDA the Triton kernels when ``QUARL_TRITON=1`` (``gpu.py``); other large CPU tensors (>= 2^18 elements;
CUDA only with ``QUARL_COMPILE=1``) the compiled path (``fast.py``, whose first call per format and process pays a
``torch.compile``: ~10-35 s cold, ~3-11 s from Inductor's on-disk cache; ``QUARL_COMPILE=0`` turns it off); the
rest eager. :func:`fake_quantizer` binds a format once for hot loops (the injector's activation path).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import fast, gpu, native
from .blocking import from_blocks, to_blocks
from .quantize import block_quantize, check_global_amax, check_input, fake_quantize_eager, resolve_format
from .registry import QFormat, SteMode
from .registry import _choice as choice


def _forward(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None, global_amax: torch.Tensor | None
) -> torch.Tensor:
    """fp32 fake-quantized ``x``: the native kernel, else the compiled path, else eager (all bit-identical)."""
    y = gpu.try_fake_quantize(x, fmt, global_amax) if x.is_cuda else native.fake_quantize(x, fmt, global_amax)
    if y is None:
        y = fast.try_fake_quantize(x, fmt, generator, global_amax)
    return y if y is not None else fake_quantize_eager(x, fmt, generator, global_amax)


def _forward_with_mask(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None, global_amax: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 fake-quantized ``x`` and the bool mask of non-saturated elements (eager)."""
    if fmt.hadamard:
        raise ValueError("ste='clipped' is not defined for hadamard-rotated formats (the clip happens in the rotated basis)")
    if x.numel() == 0:
        empty = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        return empty, empty.bool()
    bq, layout = block_quantize(x, fmt, generator, global_amax)
    xb, _ = to_blocks(x.to(torch.float32), layout.axis, layout.block, layout.per_tensor)
    keep = xb.abs() <= fmt.elem_max * bq.dq
    return from_blocks(bq.values * bq.dq, layout), from_blocks(keep, layout)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: fake quantization. Backward: straight-through (identity or clipped)."""

    @staticmethod
    def forward(ctx, x, fmt, ste, generator, global_amax):  # noqa: D102
        if ste is SteMode.CLIPPED:
            y, keep = _forward_with_mask(x, fmt, generator, global_amax)
            ctx.save_for_backward(keep)
        else:
            y = _forward(x, fmt, generator, global_amax)
        ctx.clipped = ste is SteMode.CLIPPED
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if ctx.clipped:
            (keep,) = ctx.saved_tensors
            grad_out = torch.where(keep, grad_out, torch.zeros_like(grad_out))
        return grad_out, None, None, None, None


def fake_quantize(
    x: torch.Tensor, fmt: str | QFormat, *, ste: str | SteMode = SteMode.IDENTITY,
    generator: torch.Generator | None = None, global_amax: torch.Tensor | None = None, **options,
) -> torch.Tensor:
    """Quantize-dequantize ``x``; differentiable with a straight-through estimator.

    Args:
        x: float tensor (fp32 / bf16 / fp16 / fp64); computed in fp32, returned in ``x.dtype``.
        fmt: a QFormat or a format name; ``options`` go to ``get_format`` (``fake_quantize(x, "mxfp4",
            scale_mode="rceil")``).
        ste: ``"identity"`` or ``"clipped"`` (zero gradient where ``x`` saturated).
        generator: RNG for ``rounding="stochastic"``.
        global_amax: static per-tensor amax instead of the tensor's own (NVFP4, per-tensor FP8 / INT); required
            when ``fmt.tensor_scale`` is ``static`` (ValueError otherwise).
        **options: format options.

    Returns:
        Tensor like ``x``, equal bit for bit to ``dequantize(quantize(x, fmt))``.

    Note:
        MX / NVFP4: the first call on a machine builds the native kernel (~0.5 s, then cached on disk). Other
        formats: the first call with a large CPU tensor (>= 2^18 elements) compiles the fast path for that format,
        once per process: ~10-35 s on a cold cache, ~3-11 s when Inductor's on-disk cache
        (``~/.cache/quarl/inductor``) has it. ``QUARL_NATIVE=0`` / ``QUARL_COMPILE=0`` keep everything eager (same
        results).

    Example:
        >>> import torch
        >>> fake_quantize(torch.tensor([0.25, 0.75, 1.25, 5.0, 7.0] + [0.0] * 27), "mxfp4")[:5].tolist()
        [0.0, 1.0, 1.0, 4.0, 6.0]
    """
    fmt = resolve_format(fmt, options)
    ste = choice(SteMode, ste, "ste")
    check_input(x, fmt)
    check_global_amax(fmt, global_amax)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantSTE.apply(x, fmt, ste, generator, global_amax)
    y = _forward(x, fmt, generator, global_amax)
    return y if y.dtype is x.dtype else y.to(x.dtype)  # (a same-dtype .to still costs ~2.5 us per call)


def fake_quantizer(fmt: str | QFormat, *, ste: str | SteMode = SteMode.IDENTITY,
                   global_amax: torch.Tensor | None = None, **options) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lambda x: fake_quantize(x, fmt, ste=ste, global_amax=global_amax)``, the format resolved and the native
    kernel bound once (a static ``global_amax`` is checked here, at bind time, and passed on every call).

    For hot loops (an activation fake-quant per linear per decode step): it skips the per-call format resolution and
    dispatch, so a decode-shape call costs the kernel plus a few us. Results and gradients are those of
    :func:`fake_quantize` bit for bit: with a gradient to build it calls ``fake_quantize`` itself (the STE); otherwise
    the native kernel, else the compiled / eager paths.

    Example:
        >>> import torch
        >>> fq = fake_quantizer("mxfp4")
        >>> x = torch.randn(4, 64)
        >>> torch.equal(fq(x), fake_quantize(x, "mxfp4"))
        True
    """
    fmt = resolve_format(fmt, options)
    ste = choice(SteMode, ste, "ste")
    check_global_amax(fmt, global_amax)
    if global_amax is not None:
        amax = global_amax.detach().to(torch.float32).reshape(1).clone()
        return lambda x: fake_quantize(x, fmt, ste=ste, global_amax=amax.to(x.device))
    kernel = native.bind(fmt)

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return fake_quantize(x, fmt, ste=ste)
        if kernel is not None:
            y = kernel(x)
            if y is not None:
                return y if y.dtype is x.dtype else y.to(x.dtype)
        check_input(x, fmt)
        return _forward(x, fmt, None, None).to(x.dtype)

    return apply
