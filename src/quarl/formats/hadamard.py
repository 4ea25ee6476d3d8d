"""16-wide random Hadamard transform (RHT), the pre-rotation of TransformerEngine's NVFP4 recipe.

Why: rotating each 16-element tile by an orthonormal matrix spreads outliers across the tile before block scaling
(arXiv 2509.25149; TE ``NVFP4BlockScaling``).

Math: ``R = diag(signs) @ H16 / 4`` with ``H16`` the Sylvester Hadamard matrix (entries +-1, ``H H^T = 16 I``), so
``R R^T = I`` and every entry of ``R`` is +-1/4 (exact in fp32). A tensor is rotated along ``axis`` tile by tile:
``x' = x_tile @ R``; the inverse is ``x'_tile @ R^T``. TE's default sign vector is
:data:`quarl.formats.registry.TE_HADAMARD_SIGNS`.

Basis convention in quarl: ``quantize`` stores the codes of the *rotated* tensor; ``dequantize`` and
``fake_quantize`` return values in the *original* basis (``Q(x R) R^T``), so a fake-quantized operand is a drop-in
replacement and ``(Q(xR) R^T)(Q(wR) R^T)^T = Q(xR) Q(wR)^T`` equals the rotated GEMM. Use :func:`rotate` to obtain
the rotated basis. The fp32 matmul rounds (sums of 16 products), so the rotation itself is not bit-exact with TE's
BF16 kernel; the quantization after it is.
"""

from __future__ import annotations

import torch

from .blocking import check_axis

TILE = 16


def hadamard_matrix(signs: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal 16x16 ``diag(signs) @ H16 / 4`` (fp32)."""
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < TILE:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.tensor(signs, dtype=torch.float32).unsqueeze(1)
    return (s * h / 4.0).to(device)


def rotate(x: torch.Tensor, signs: tuple[int, ...], axis: int = -1, inverse: bool = False) -> torch.Tensor:
    """Rotate fp32 ``x`` tile-wise along ``axis`` by ``R`` (or ``R^T`` when ``inverse``).

    Args:
        x: fp32 tensor whose ``axis`` length is a multiple of 16.
        signs: 16 values in {+1, -1}.
        axis: the axis to rotate along (``-x.dim() <= axis < x.dim()``, ValueError otherwise).
        inverse: apply ``R^T`` (undo a rotation).

    Returns:
        fp32 tensor of the same shape.
    """
    if x.dim() > 0:
        axis = check_axis(axis, x.dim())
    if x.dim() == 0 or x.shape[axis] % TILE:
        raise ValueError(f"hadamard rotation needs the axis length to be a multiple of {TILE}, got shape {tuple(x.shape)}")
    r = hadamard_matrix(signs, x.device)
    r = r.t() if inverse else r
    moved = x.movedim(axis, -1)
    tiles = moved.reshape(*moved.shape[:-1], -1, TILE)
    out = (tiles @ r).reshape(moved.shape)
    return out.movedim(-1, axis)
