"""``quantize`` / ``dequantize`` and :class:`QuantizedTensor`; the shared path that ``fake_quantize`` reuses.

Why: one code path from a tensor to (grid values, per-block multipliers) serves both the stored form (codes +
scales) and fake quantization, so ``fake_quantize(x) == dequantize(quantize(x))`` holds bit for bit by construction:
both compute ``grid_value * dq`` with the same ``dq``, and ``decode(encode(v)) == v`` for every grid value
(tests/formats/test_codes.py).

Inputs of any float dtype are computed in fp32 and the result is returned in the input dtype. Empty tensors give
empty outputs. NaN grid values (only possible inside blocks whose scale is already NaN) are stored as code 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import mx, nvfp4, scaled
from .blocking import (
    BlockLayout, BlockQuant, check_axis, from_blocks, scales_from_layout, scales_to_layout, to_blocks,
)
from .codes import decode, encode
from .hadamard import rotate
from .registry import Family, Granularity, QFormat, RoundingMode, TensorScale, get_format
from .scaled import nf4_levels


@dataclass(frozen=True)
class QuantizedTensor:
    """Stored form of a quantized tensor.

    Attributes:
        codes: uint8, same shape as the input (one unpacked code per element; see ``codes.py`` for the bit layout;
            pack 4-bit codes with ``pack_fp4``). With ``hadamard`` these are codes of the rotated tensor.
        scales: per-block scales with the block axis in place (``n_blocks = ceil(len / block_size)``): uint8 E8M0
            (MX), ``torch.float8_e4m3fn`` (NVFP4), fp32 (FP8 / INT / NF4; per-tensor: shape ``(1,)``).
        global_scale: NVFP4 per-tensor fp32 ``(1,)`` in the profile's own convention (compressed_tensors and vllm: the
            encode factor ``2688 / amax``; torchao: the decode factor ``amax / 2688``; transformer_engine: ``amax``);
            with ``tensor_scale="per_token"`` one per row, shaped like ``scales`` with a block axis of length 1;
            else None.
        shape: input shape.
        dtype: input dtype (``dequantize`` returns it).
        fmt: the format.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    fmt: QFormat


def resolve_format(fmt: str | QFormat, options: dict) -> QFormat:
    """A QFormat from a name or QFormat plus options (validated by ``get_format``)."""
    if isinstance(fmt, QFormat) and not options:
        return fmt
    return get_format(fmt, **options)


def _layout_args(fmt: QFormat) -> tuple[int, int, bool]:
    per_tensor = fmt.family is Family.SCALED and fmt.granularity is Granularity.PER_TENSOR
    return fmt.axis, fmt.block_size, per_tensor


def _noise(xb: torch.Tensor, fmt: QFormat, generator: torch.Generator | None) -> torch.Tensor | None:
    """U[0,1) samples for stochastic rounding: the given generator, else a fresh one seeded by ``fmt.seed``."""
    if fmt.rounding is not RoundingMode.STOCHASTIC:
        return None
    if generator is None and fmt.seed is not None:
        generator = torch.Generator(device=xb.device).manual_seed(fmt.seed)
    return torch.rand(xb.shape, generator=generator, dtype=torch.float32, device=xb.device)


def check_input(x: torch.Tensor, fmt: QFormat) -> None:
    """ValueError unless ``x`` is floating point and ``fmt.axis`` indexes one of its dims.

    Checked before the empty-tensor shortcut and the compiled path, so an out-of-range axis fails the same way for
    every input (per-tensor scaling without rotation ignores the axis; 0-D tensors get ``to_blocks``' error).
    """
    if not torch.is_floating_point(x):
        raise ValueError(f"quarl.formats quantizes floating-point tensors, got {x.dtype}")
    if x.dim() > 0 and (fmt.hadamard or not _layout_args(fmt)[2]):
        check_axis(fmt.axis, x.dim())


def check_global_amax(fmt: QFormat, global_amax: torch.Tensor | None) -> None:
    """ValueError when a static amax is missing, unsupported, or given where the format computes its own per row.

    Why: a ``tensor_scale="static"`` format called without its calibrated amax must fail, never quantize with a
    dynamic scale that nobody asked for.
    """
    if global_amax is None:
        if fmt.tensor_scale is TensorScale.STATIC:
            raise ValueError(f"{fmt.name}: tensor_scale='static' needs a calibrated global_amax (none was given); "
                             "quarl never falls back to a dynamic scale")
        return
    if fmt.family is Family.SCALED:
        if fmt.granularity is not Granularity.PER_TENSOR:
            raise ValueError(f"global_amax is a per-tensor amax; {fmt.name} has granularity={fmt.granularity.value!r}")
    elif fmt.family is not Family.NVFP4:
        raise ValueError("global_amax is an NVFP4 option or a per-tensor FP8 / INT option (a static, calibrated amax)")
    if fmt.tensor_scale is TensorScale.PER_TOKEN:
        raise ValueError("tensor_scale='per_token' computes one global scale per row; a static global_amax cannot be "
                         "combined with it")


def _per_row_global(fmt: QFormat) -> bool:
    return fmt.family is Family.NVFP4 and fmt.tensor_scale is TensorScale.PER_TOKEN


def block_quantize(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None = None, global_amax: torch.Tensor | None = None
) -> tuple[BlockQuant, BlockLayout]:
    """Grid values and per-block multipliers of ``x`` in block layout (the shared core of all entry points).

    Args:
        x: float tensor (any dtype; computed in fp32). Rotated first when ``fmt.hadamard``.
        fmt: the format.
        generator: RNG for stochastic rounding.
        global_amax: NVFP4 / per-tensor FP8 / INT: a static per-tensor amax ``(1,)`` instead of the tensor's own
            (see :func:`check_global_amax`).

    Returns:
        ``(BlockQuant, layout)``; NaN grid values are replaced by +0.0 (their block's multiplier is NaN).
    """
    check_global_amax(fmt, global_amax)
    x32 = x.to(torch.float32)
    if fmt.hadamard:
        x32 = rotate(x32, fmt.hadamard_signs, fmt.axis)
    xb, layout = to_blocks(x32, *_layout_args(fmt))
    noise = _noise(xb, fmt, generator)
    if fmt.family is Family.MX:
        bq = mx.quantize_blocks(xb, fmt, noise)
    elif fmt.family is Family.NVFP4:
        bq = nvfp4.quantize_blocks(xb, fmt, noise, global_amax)
    elif fmt.family is Family.SCALED:
        bq = scaled.quantize_blocks(xb, fmt, noise, global_amax)
    else:
        bq = scaled.quantize_blocks_nf4(xb, fmt, noise)
    values = torch.where(torch.isnan(bq.values), torch.zeros_like(bq.values), bq.values)
    return bq._replace(values=values), layout


def _unrotate(y: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    return rotate(y, fmt.hadamard_signs, fmt.axis, inverse=True) if fmt.hadamard else y


def fake_quantize_eager(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None = None, global_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """``dequantize(quantize(x))`` without materializing codes (fp32 result, original basis)."""
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=torch.float32, device=x.device)
    bq, layout = block_quantize(x, fmt, generator, global_amax)
    return _unrotate(from_blocks(bq.values * bq.dq, layout), fmt)


def quantize(
    x: torch.Tensor, fmt: str | QFormat, *, generator: torch.Generator | None = None,
    global_amax: torch.Tensor | None = None, **options,
) -> QuantizedTensor:
    """Quantize ``x`` to codes and scales.

    Args:
        x: float tensor (fp32 / bf16 / fp16 / fp64), computed in fp32.
        fmt: a QFormat or a format name (then ``options`` are passed to ``get_format``).
        generator: RNG for ``rounding="stochastic"`` (else ``fmt.seed``, else torch's global RNG).
        global_amax: static per-tensor amax (calibrated) instead of the tensor's own (NVFP4, per-tensor FP8 / INT);
            required when ``fmt.tensor_scale`` is ``static``.
        **options: format options, see ``get_format``.

    Returns:
        QuantizedTensor.
    """
    fmt = resolve_format(fmt, options)
    check_input(x, fmt)
    check_global_amax(fmt, global_amax)
    if x.numel() == 0:
        empty = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        return QuantizedTensor(empty, torch.empty(0, device=x.device), None, x.shape, x.dtype, fmt)
    bq, layout = block_quantize(x, fmt, generator, global_amax)
    if fmt.family is Family.NF4:
        codes = torch.bucketize(bq.values, nf4_levels(x.device)).to(torch.uint8)  # exact level -> its index
    else:
        codes = encode(bq.values, fmt.elem)
    g = scales_to_layout(bq.global_scale, layout) if _per_row_global(fmt) else bq.global_scale
    return QuantizedTensor(from_blocks(codes, layout), scales_to_layout(bq.scales, layout), g, x.shape, x.dtype, fmt)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Values of a QuantizedTensor in its original dtype (original basis when the format rotates).

    Args:
        q: from :func:`quantize`.

    Returns:
        Tensor of shape ``q.shape`` and dtype ``q.dtype``.
    """
    fmt = q.fmt
    if q.codes.numel() == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.codes.device)
    if fmt.family is Family.NF4:
        values = nf4_levels(q.codes.device)[q.codes.long()]
    else:
        values = decode(q.codes, fmt.elem)
    vb, layout = to_blocks(values, *_layout_args(fmt))
    module = {Family.MX: mx, Family.NVFP4: nvfp4, Family.SCALED: scaled, Family.NF4: scaled}[fmt.family]
    g = scales_from_layout(q.global_scale, layout) if _per_row_global(fmt) else q.global_scale
    dq = module.dequant_scale(scales_from_layout(q.scales, layout), g, fmt)
    return _unrotate(from_blocks(vb * dq, layout), fmt).to(q.dtype)
