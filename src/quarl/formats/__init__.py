"""quarl.formats -- bit-exact emulation of low-bit number formats (pure numerics: tensor in, tensor out).

API::

    from quarl.formats import get_format, quantize, dequantize, fake_quantize, pack_fp4, unpack_fp4, FORMATS
    fmt = get_format("nvfp4", profile="compressed_tensors")   # frozen QFormat
    q = quantize(x, fmt)          # QuantizedTensor(codes uint8, scales, global_scale, shape, dtype, fmt)
    y = dequantize(q)             # x.dtype, x.shape
    z = fake_quantize(x, fmt)     # == dequantize(quantize(x, fmt)) bit for bit; STE gradient
    z = fake_quantize(x, "mxfp4", scale_mode="rceil")        # a name plus options works everywhere
    fq = fake_quantizer(fmt); z = fq(x)                       # the same, resolved once (hot loops)

Formats (``FORMATS`` maps each name to its default QFormat):

==============  ==============================  ==========================================  ====================
name            element grid                    scale                                       default block
==============  ==============================  ==========================================  ====================
``mxfp4``       E2M1 (max 6)                    E8M0 power of two per block                 32 along ``axis``
``mxfp6_e2m3``  E2M3 (max 7.5)                  E8M0                                        32
``mxfp6_e3m2``  E3M2 (max 28)                   E8M0                                        32
``mxfp8_e4m3``  E4M3 (max 448)                  E8M0                                        32
``mxfp8_e5m2``  E5M2 (max 57344)                E8M0                                        32
``mxint8``      k/64, k in [-127, 127]          E8M0                                        32
``nvfp4``       E2M1                            E4M3 per block x fp32 per tensor            16
``fp8_e4m3``    E4M3                            fp32 amax/448                               per_tensor
``fp8_e5m2``    E5M2                            fp32 amax/57344                             per_tensor
``int8``        [-128, 127]                     fp32 amax/127.5 (symmetric)                 per_channel
``int4``        [-8, 7]                         fp32 amax/7.5 (symmetric)                   per_group, 128
``nf4``         bitsandbytes' 16 NF4 levels     fp32 absmax                                 64
==============  ==============================  ==========================================  ====================

Options (``get_format(name, **options)``; an unknown name, option or value raises ``ValueError`` listing the valid
ones; enum options take the enum member or its string value):

* all block formats: ``axis`` (int, default -1: blocks run along the last dim); ``hadamard`` (bool, default False:
  16-wide random Hadamard pre-rotation along ``axis``; ``quantize`` stores rotated codes, ``dequantize`` and
  ``fake_quantize`` return the ORIGINAL basis, see ``hadamard.py``) with ``hadamard_signs`` (16 x +-1, default
  TransformerEngine's ``TE_HADAMARD_SIGNS``; not for nf4).
* MX (``mx*``): ``block_size`` (default 32); ``scale_mode`` = ``floor`` (default, OCP) | ``ceil`` | ``even`` |
  ``rceil`` (:class:`ScaleMode`); ``rounding`` = ``rne`` (default) | ``half_away`` (microxcaling "nearest") |
  ``stochastic`` (:class:`RoundingMode`); ``seed`` (int, for stochastic); ``profile`` = ``ocp`` (default) |
  ``compressed_tensors`` (its EVEN scale rounding; mxfp4 / mxfp6_e2m3 / mxfp8_e4m3 only).
* ``nvfp4``: ``profile`` = ``compressed_tensors`` (default) | ``torchao`` | ``transformer_engine`` | ``vllm``
  (vLLM's emulation reference, docs/formats-vllm.md); ``block_size`` (default 16); ``block_2d`` (bool: 16x16
  tiles, TE weights); ``rounding``; ``seed``; ``nonfinite`` = ``reference`` (default) | ``block`` (:class:`NonFinite`);
  ``tensor_scale`` = ``dynamic`` (default: amax per call) | ``static`` (calibrated) | ``per_token`` (one global
  scale per row) (:class:`TensorScale`). ``quantize``/``fake_quantize``/``fake_quantizer`` take ``global_amax=`` (a
  static, calibrated per-tensor amax; required with ``tensor_scale="static"``, which never falls back to dynamic).
* ``fp8_*``, ``int8``, ``int4``: ``granularity`` = ``per_tensor`` | ``per_channel`` | ``per_token`` | ``per_group``
  (:class:`Granularity`); ``group_size`` (per_group only, default 128); ``rounding``; ``seed``;
  ``profile`` = ``compressed_tensors``; ``tensor_scale`` = ``dynamic`` | ``static`` (per_tensor only, with
  ``global_amax=``).
* ``nf4``: ``block_size`` (default 64); ``profile`` = ``bitsandbytes``.
* ``fake_quantize`` only: ``ste`` = ``identity`` (default) | ``clipped`` (:class:`SteMode`); ``generator=`` a
  ``torch.Generator`` for stochastic rounding (otherwise ``seed`` gives a fresh generator per call, otherwise torch's
  global RNG).

Policies (details in each family module):

* rounding: RNE by default; element overflow saturates to +-max (never Inf); exponents come from fp32 bits.
* non-finite input: a block/group that holds NaN or Inf dequantizes to all-NaN; other blocks are unaffected. NVFP4
  (``nonfinite`` option, :class:`NonFinite`): ``"reference"`` (default) reproduces each profile's reference, whose
  per-tensor amax carries the NaN / Inf into other blocks (e.g. compressed_tensors: an Inf makes the whole tensor
  NaN); ``"block"`` is the block-local policy above (per-tensor amax over the finite elements).
* zeros: all-zero blocks and tensors give zeros, never NaN, in every default profile. ``nvfp4`` with
  ``profile="torchao"`` reproduces torchao's NaN for an all-zero tensor.
* ``-0.0``: float grids keep the sign of zero (code with the sign bit); integer grids and NF4 return +0.0.
* a last block shorter than ``block_size`` is zero-padded for its scale (microxcaling / compressed-tensors groups);
  outputs keep the input's shape.
* dtypes: any float input is computed in fp32 and returned in its own dtype; empty tensors give empty results.

Codes: ``QuantizedTensor.codes`` are unpacked uint8 (one per element): sign|exponent|mantissa for float grids,
two's complement for integers, the level index for NF4. ``pack_fp4`` packs 4-bit codes two per byte, the even element
in the low nibble (compressed-tensors / torchao layout).

Each difference between the references (listed in docs/formats.md) is reproduced by a profile or option, or documented
as not reproduced in ``mx.py`` / ``nvfp4.py`` / ``scaled.py``.

Speed: MX and NVFP4 ``fake_quantize`` run a native C kernel (``native.py``; built once per machine in ~1 s, eager
fallback without a compiler), other formats the compiled path for large CPU tensors (``fast.py``), else eager; all
three are bit-identical.
"""

from .fake_quant import fake_quantize, fake_quantizer
from .packing import pack_fp4, unpack_fp4
from .quantize import QuantizedTensor, dequantize, quantize
from .registry import (
    FORMATS,
    TE_HADAMARD_SIGNS,
    Family,
    Granularity,
    NonFinite,
    Profile,
    QFormat,
    ScaleMode,
    SteMode,
    TensorScale,
    get_format,
)
from .rounding import RoundingMode
from .stats import error_stats

__all__ = [
    "FORMATS",
    "TE_HADAMARD_SIGNS",
    "Family",
    "Granularity",
    "NonFinite",
    "Profile",
    "QFormat",
    "QuantizedTensor",
    "RoundingMode",
    "ScaleMode",
    "SteMode",
    "TensorScale",
    "dequantize",
    "error_stats",
    "fake_quantize",
    "fake_quantizer",
    "get_format",
    "pack_fp4",
    "quantize",
    "unpack_fp4",
]
