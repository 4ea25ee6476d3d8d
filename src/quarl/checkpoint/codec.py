"""Tensor-level codec: one linear weight <-> the compressed-tensors tensors that store it.

``compress_weight`` quantizes with ``quarl.formats.quantize`` (compressed-tensors profile) and lays the codes and
scales out as compressed-tensors 0.20 does on disk (see ``schemes.py`` for the table); ``weight_quantized`` reads
them back into a :class:`quarl.formats.QuantizedTensor`, so ``dequantize`` of it equals
``fake_quantize(W, scheme.weight_fmt)`` bit for bit (the same numbers, only re-laid-out).

Layout conversions (all exact bit manipulations, no arithmetic on values):

* FP4 (NVFP4, MXFP4): ``quarl.formats.pack_fp4`` already writes compressed-tensors' ``pack_fp4_to_uint8`` layout,
  codes included: a small negative weight that rounds to zero is code 8 (``-0``) in both (its packer takes the sign
  from ``signbit``), which is what llm-compressor's output holds too.
* INT4 (``pack-quantized``): quarl's two's-complement nibble ``c`` becomes compressed-tensors' offset value
  ``c ^ 8`` (= ``q + 8``); eight per int32 word, element ``k`` at bits ``4k``, rows zero-padded to a multiple of 32
  elements (``pack_to_int32``).
* FP8 (``float-quantized``): quarl's E4M3 code is the OCP bit pattern, i.e. the bits of ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

import math

import torch

from quarl.formats import QuantizedTensor, pack_fp4, quantize, unpack_fp4

from .schemes import CheckpointScheme

_NIBBLES = 8  # int4 values per int32 word


def compress_weight(weight: torch.Tensor, scheme: CheckpointScheme,
                    global_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one 2-D weight ``(out, in)``.

    Args:
        weight: the full-precision weight (any float dtype; quantized in fp32).
        scheme: the checkpoint scheme.
        global_amax: NVFP4 only: the per-tensor amax to derive ``weight_global_scale`` from (the joint amax of a
            fused q/k/v or gate/up group); None uses the weight's own.

    Returns:
        Local-name tensors (``weight_packed``, ``weight_scale``, ...), contiguous, on the weight's device.
    """
    if weight.dim() != 2:
        raise ValueError(f"compress_weight expects a 2-D linear weight, got shape {tuple(weight.shape)}")
    q = quantize(weight.detach(), scheme.weight_fmt,
                 **({"global_amax": global_amax} if global_amax is not None else {}))
    if scheme.packs_fp4:
        if weight.shape[1] % q.fmt.block_size:
            raise ValueError(f"{scheme.name}: in_features {weight.shape[1]} is not a multiple of the block size "
                             f"{q.fmt.block_size}; compressed-tensors cannot store a partial block")
        out = {"weight_packed": pack_fp4(q.codes),
               "weight_scale": q.scales}
        if q.global_scale is not None:
            out["weight_global_scale"] = q.global_scale.reshape(1)
    elif scheme.ct_format == "pack-quantized":
        if weight.shape[1] % q.fmt.block_size:  # compressed-tensors' and vLLM's group kernels refuse a partial group
            raise ValueError(f"{scheme.name}: in_features {weight.shape[1]} is not a multiple of the group size "
                             f"{q.fmt.block_size}; compressed-tensors cannot store a partial group")
        out = {"weight_packed": pack_int4(q.codes), "weight_scale": q.scales,
               "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    else:  # float-quantized FP8
        out = {"weight": q.codes.view(torch.float8_e4m3fn), "weight_scale": q.scales.reshape(1)}
    return {k: v.contiguous() for k, v in out.items()}


def weight_quantized(tensors: dict[str, torch.Tensor], scheme: CheckpointScheme, shape: tuple[int, int],
                     dtype: torch.dtype) -> QuantizedTensor:
    """Rebuild the :class:`QuantizedTensor` of one weight from its stored tensors (inverse of `compress_weight`).

    Args:
        tensors: the module's stored tensors (local names).
        scheme: the checkpoint scheme.
        shape: ``(out_features, in_features)``.
        dtype: the dtype ``dequantize`` returns.
    """
    fmt = scheme.weight_fmt
    if scheme.packs_fp4:
        codes = unpack_fp4(tensors["weight_packed"])
        global_scale = tensors.get("weight_global_scale")
    elif scheme.ct_format == "pack-quantized":
        codes = unpack_int4(tensors["weight_packed"], shape[1])
        global_scale = None
    else:
        codes = tensors["weight"].view(torch.uint8)
        global_scale = None
    if tuple(codes.shape) != tuple(shape):
        raise ValueError(f"stored {scheme.name} weight decodes to shape {tuple(codes.shape)}, expected {shape}")
    return QuantizedTensor(codes, tensors["weight_scale"], global_scale, torch.Size(shape), dtype, fmt)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """quarl int4 codes (two's-complement nibbles, uint8 ``(rows, cols)``) -> compressed-tensors int32 words."""
    rows, cols = codes.shape
    offset = (codes ^ 0x8).to(torch.int64)  # two's complement -> q + 8 in [0, 15]
    padded = math.ceil(cols / 32) * 32
    offset = torch.nn.functional.pad(offset, (0, padded - cols))
    words = offset.reshape(rows, padded // _NIBBLES, _NIBBLES)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (words << shifts).sum(dim=-1)  # < 2^32: exact in int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # reinterpret as signed
    return packed[:, : math.ceil(cols * 4 / 32)]


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> uint8 two's-complement nibbles ``(rows, cols)``."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (words[..., None] >> shifts) & 0xF  # (rows, words, 8)
    return (nibbles.reshape(packed.shape[0], -1)[:, :cols].to(torch.uint8)) ^ 0x8


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a module's stored tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
