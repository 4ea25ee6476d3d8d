"""FP4 packing: two 4-bit codes per byte, the even element in the low nibble.

This is the compressed-tensors ``pack_fp4_to_uint8`` / torchao ``pack_uint4`` / TE ``cast_to_fp4x2`` layout
(``byte = code[2i] | code[2i+1] << 4``: torchao ``pack_uint4``, compressed-tensors ``pack_fp4_to_uint8``). bitsandbytes
NF4 uses the opposite nibble order; quarl packs every 4-bit code (E2M1, INT4, NF4) this one way.
"""

from __future__ import annotations

import torch


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 4-bit codes pairwise along the last dim.

    Args:
        codes: uint8 tensor ``(..., K)`` with values < 16 and ``K`` even.

    Returns:
        uint8 tensor ``(..., K // 2)``; element ``2i`` in the low nibble, ``2i + 1`` in the high nibble.
    """
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack_fp4 expects uint8 codes, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dim, got shape {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 0xF:
        raise ValueError("pack_fp4: codes must be 4-bit (< 16)")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``(..., K // 2)`` -> uint8 codes ``(..., K)``."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_fp4 expects uint8, got {packed.dtype}")
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)
