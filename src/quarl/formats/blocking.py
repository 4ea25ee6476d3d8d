"""Reshape a tensor into scale blocks along one axis and back.

Why: every format is "one scale per ``block_size`` contiguous elements along ``axis``" (MX, NVFP4, NF4, per-group
INT/FP8); per-channel/per-token is the special case block = whole axis, per-tensor the case block = everything.

Padding policy: when the axis length is not a multiple of ``block_size`` the last, partial block is zero-padded for
the scale computation (microxcaling ``_reshape_to_blocks``; compressed-tensors group quantization with
``ceil(n / group_size)`` groups). Zeros never change a block's amax, so a partial block is scaled by the amax of its
real elements. The padding is dropped again: codes and outputs have the input's shape, scales have ``ceil(n/B)``
entries along the axis. torchao instead asserts divisibility; we accept more inputs and agree wherever it accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockLayout:
    """How ``to_blocks`` rearranged a tensor (enough to undo it)."""

    shape: tuple[int, ...]  # original shape
    axis: int  # normalized (non-negative) block axis
    length: int  # original length of the block axis
    block: int  # elements per block (after resolving 0 = whole axis / whole tensor)
    per_tensor: bool


def check_axis(axis: int, ndim: int) -> int:
    """``axis`` normalized to ``[0, ndim)``; ValueError unless ``-ndim <= axis < ndim`` (no silent wrap-around).

    Why: ``axis % ndim`` would let ``axis=5`` or ``axis=-3`` on a 2-D tensor quietly mean axis 1.
    """
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for a {ndim}-D tensor (valid: {-ndim} <= axis < {ndim})")
    return axis % ndim


def to_blocks(x: torch.Tensor, axis: int, block_size: int, per_tensor: bool = False) -> tuple[torch.Tensor, BlockLayout]:
    """View ``x`` as ``(..., n_blocks, block)`` with blocks along ``axis`` (moved last), zero-padding a partial block.

    Args:
        x: tensor of any shape (at least 1-D unless ``per_tensor``).
        axis: block axis, ``-x.dim() <= axis < x.dim()`` (ValueError otherwise).
        block_size: elements per block; 0 means the whole axis.
        per_tensor: one block holding every element (``axis``/``block_size`` ignored).

    Returns:
        ``(blocks, layout)``; ``blocks`` is contiguous.
    """
    if per_tensor:
        n = x.numel()
        return x.reshape(1, 1, n), BlockLayout(tuple(x.shape), 0, n, n, True)
    if x.dim() == 0:
        raise ValueError("block quantization needs at least a 1-D tensor")
    ax = check_axis(axis, x.dim())
    moved = x.movedim(ax, -1) if ax != x.dim() - 1 else x
    length = moved.shape[-1]
    block = block_size if block_size > 0 else max(length, 1)
    pad = (-length) % block
    if pad:
        moved = F.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], (length + pad) // block, block)
    return blocks, BlockLayout(tuple(x.shape), ax, length, block, False)


def from_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`to_blocks` (drops padding, moves the axis back)."""
    if layout.per_tensor:
        return blocks.reshape(layout.shape)
    flat = blocks.reshape(*blocks.shape[:-2], -1)
    if flat.shape[-1] != layout.length:
        flat = flat[..., : layout.length]
    last = len(layout.shape) - 1
    return flat.movedim(-1, layout.axis) if layout.axis != last else flat


def scales_to_layout(scales: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Per-block scales ``(..., n_blocks, 1)`` -> stored form: block axis back in place (per-tensor: shape ``(1,)``)."""
    s = scales.squeeze(-1)
    if layout.per_tensor:
        return s.reshape(1)
    last = len(layout.shape) - 1
    return s.movedim(-1, layout.axis) if layout.axis != last else s


def scales_from_layout(scales: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`scales_to_layout`: stored scales -> ``(..., n_blocks, 1)``."""
    if layout.per_tensor:
        return scales.reshape(1, 1, 1)
    last = len(layout.shape) - 1
    s = scales.movedim(layout.axis, -1) if layout.axis != last else scales
    return s.unsqueeze(-1)


class BlockQuant(NamedTuple):
    """Result of a family's block quantizer, all in block layout ``(..., n_blocks, block)``.

    ``values * dq`` is the fake-quantized tensor; ``values`` are element-grid values (fp32), ``dq`` the per-block
    fp32 dequantization multiplier ``(..., n_blocks, 1)``, ``scales`` the stored per-block scale (``(..., n_blocks, 1)``,
    storage dtype) and ``global_scale`` the stored per-tensor scale (fp32 ``(1,)``) or None.
    """

    values: torch.Tensor
    dq: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None
