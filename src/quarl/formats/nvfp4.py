"""NVFP4: E2M1 elements, one E4M3 scale per 16 elements, times one fp32 per-tensor scale.

Math (the three references' NVFP4 recipes). ``T = amax(|x|)`` over the tensor, ``b = amax(|x|)`` over a block,
``e4m3()`` = RNE onto the E4M3 grid, saturating (computed with :func:`round_to_float_grid`, equal to
``.to(torch.float8_e4m3fn)`` on torch 2.13):

* ``compressed_tensors`` (default; what llm-compressor writes and vLLM serves; CT 0.20 ``generate_gparam``,
  ``calculate_qparams``, ``_quantize_dequantize``)::

      gs  = nan_to_num(reciprocal(max(T, fp32_tiny)) * 2688, nan/inf -> 1)   # stored global_scale (encode factor)
      s8  = e4m3(clamp(gs * (b / 6), +-448)); s8 == 0 -> 0.125              # stored scales
      eff = s8 / gs;   q = e2m1(clamp(x / eff, +-6));   y = q * eff           # true division, as CT

* ``torchao`` (``nvfp4_quantize`` with a per-tensor scale; ``per_tensor_amax_to_scale``)::

      pts = T / 2688                                                          # stored global_scale (decode factor)
      s8  = e4m3(clamp((b / 6) / pts, 2^-6, 448))                             # never an E4M3 subnormal
      q   = e2m1(clamp(x * (reciprocal(pts) / s8), +-6));   y = q * (pts * s8)

* ``transformer_engine`` (NVFP4BlockScaling, transcribed from the TE sources, not run: TE needs CUDA)::

      S_enc = min(2688 / T, FLT_MAX), 1 if T == 0 or S_enc == 0;  S_dec = 1 / S_enc
      s8  = e4m3(b * (S_enc * fp32(1/6)))                                      # subnormals and 0 allowed
      enc = min(1 / (s8 * S_dec), FLT_MAX);  q = e2m1(x * enc);  y = q * ((s8 * T) * fp32(1/2688))
      stored global_scale = T (TE keeps the amax)

* ``vllm`` (vLLM's emulation reference ``ref_nvfp4_quant`` / ``ref_nvfp4_quant_dequant``, CPU path; ``gs`` is the
  compressed_tensors encode factor above, i.e. the ``input_global_scale`` a checkpoint stores)::

      s8  = e4m3(clamp(gs * (b * fp32(1/6)), +-448))                          # NO zero replacement
      r(v) = reciprocal(v + 1e8 * [v == 0])                                   # vLLM get_reciprocal
      q   = e2m1(clamp(x * r(s8 * r(gs)), +-6)), a zero result unsigned;   y = q * (s8 / gs)

  It differs from ``compressed_tensors`` in three places (each shown by a test, docs/formats-vllm.md): ``b * fp32(1/6)``
  vs ``b / 6`` (one ulp apart for ~1/3 of amaxes, which moves ``s8`` when it lands on an E4M3 rounding tie); the
  element input ``x * r(s8 * r(gs))`` vs ``x / (s8 / gs)`` (a few ulps, which moves a code when it lands on an E2M1
  tie); and a block whose scale rounds to E4M3 zero gives zeros (``x * 1e-8``) where compressed_tensors uses 0.125.
  Its FP4 cast (``cast_to_fp4``) is RNE; it returns +0.0 for an input that is +-0.0 after scaling and -0.0 for a
  negative one that rounds to zero, reproduced here.

Options: ``block_2d=True`` takes ``b`` over 16x16 tiles of the last two dims (TE's weight recipe) and stores it for
every row (TE's rowwise layout). ``hadamard=True`` rotates 16-wide tiles first (see ``hadamard.py``).
Stochastic rounding (``rounding="stochastic"``) replaces ``e2m1()``'s RNE; TE's Philox stream is not reproduced.

Policies:
* Zeros: a zero block gives ``q = 0``. An all-zero tensor gives 0 in ``compressed_tensors`` (gs -> 1, s8 0 -> 0.125)
  and ``transformer_engine`` (S_enc = 1), and **NaN** in ``torchao`` (pts = 0, 0/0), reproduced on purpose and
  documented.
* Non-finite input, ``nonfinite`` option (:class:`NonFinite`):

  - ``"reference"`` (default): ``T`` is the plain ``max |x|`` (NaN propagates, Inf stays Inf) and the profile's
    formulas above run unchanged, so each profile does what its reference does:

    ===================  ==========================================  ==========================================
    profile              a NaN in the tensor                         an Inf in the tensor
    ===================  ==========================================  ==========================================
    compressed_tensors   gs = 1 (``nan_to_num``): every block is      gs = 2688/Inf = 0, eff = s8/0 = Inf:
                         rescaled as if T = 2688, the NaN block NaN  0 * Inf, the whole tensor NaN
    torchao              pts = NaN: the whole tensor NaN             pts = Inf, dq = Inf, 0 * Inf: all NaN
    transformer_engine   S_enc = NaN: the whole tensor NaN           S_enc = 1, dq = s8 * Inf: every element
                                                                     +-Inf (nonzero code) or NaN (code 0)
    vllm                 gs = 1 (compressed-tensors' factor): the    gs = 0, y = q * (s8 / 0): the whole
                         NaN block NaN, the others as if T = 2688    tensor NaN
    ===================  ==========================================  ==========================================

    compressed-tensors 0.20 and torchao 0.18 are run on such inputs in tests/formats/test_policies_nonfinite.py
    (vllm: the vLLM transcription fed compressed-tensors' own global scale);
    TE is compared with the transcription of its PyTorch reference (its CUDA kernel's ``fminf`` would turn a NaN
    amax into S_enc = FLT_MAX instead; not reproduced). With a static ``global_amax`` the block formulas run on the
    NaN / Inf elements themselves (compressed_tensors: an Inf saturates to +-6 * eff, a NaN makes its block NaN).
    quarl stores a NaN grid value as code 0 (``quantize``); the references' codes for NaN elements are arbitrary.
  - ``"block"``: ``T`` is taken over the finite elements only, and a block holding NaN/Inf gets the E4M3 NaN scale,
    so exactly that block dequantizes to NaN (quarl's uniform block-local policy, also used by MX).
* ``-0.0`` keeps its sign (CT's and TE's FP4 casts return +0).
* The three dequant product orders (``s8/gs``, ``pts*s8``, ``(s8*T)/2688``) differ by up to 1 ulp and are each
  reproduced by their profile.
"""

from __future__ import annotations

import torch

from .blocking import BlockQuant
from .registry import NonFinite, Profile, QFormat, TensorScale
from .rounding import round_elem, round_to_float_grid
from .spec import E2M1, E4M3

_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max
_E4M3_TINY = 2.0**-6  # torchao E4M3_EPS = finfo(float8_e4m3fn).tiny
_RANGE = E4M3.max_normal * E2M1.max_normal  # 2688
# vLLM multiplies by FLOAT4_E2M1_MAX_RECIPROCAL, a Python float: torch applies it to an fp32 tensor as fp32(1/6),
# which is not the same as dividing by 6 (one ulp apart for about a third of the amaxes)
_SIXTH = torch.tensor(1.0 / 6.0, dtype=torch.float32)


def tensor_amax(x: torch.Tensor, finite_only: bool = True) -> torch.Tensor:
    """fp32 ``max |x|`` (0 for an empty tensor), shape ``(1,)``.

    ``finite_only=True`` (the ``"block"`` policy): over the finite elements. ``False`` (``"reference"``): over all of
    them, NaN propagating (as ``torch.amax``) and Inf staying Inf.
    """
    if x.numel() == 0:
        return torch.zeros(1, dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x)  # one pass, no |x| temporary
    # abs(): for an all-zero tensor max(-lo, hi) can be max(-0.0, +0.0) = -0.0, and TE stores T and multiplies by it,
    # which turned an all-(+0.0) tensor into -0.0 outputs (found by tests/formats/test_properties.py)
    a = torch.maximum(-lo, hi).abs().to(torch.float32)
    if finite_only and not bool(torch.isfinite(a)):
        a = torch.where(torch.isfinite(x), x.abs(), 0.0).amax().to(torch.float32)
    return a.reshape(1)


def row_amax(xb: torch.Tensor, finite_only: bool = True) -> torch.Tensor:
    """fp32 ``max |x|`` per row of blocks ``(..., n_blocks, block)`` -> ``(..., 1, 1)`` (the per-token global amax).

    ``finite_only`` as in :func:`tensor_amax` (padding zeros never change a row's amax).
    """
    a = xb.abs()
    if finite_only:
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return a.amax(dim=(-2, -1), keepdim=True).to(torch.float32)


def _global_amax(xb: torch.Tensor, fmt: QFormat, global_amax: torch.Tensor | None) -> torch.Tensor:
    """``T`` per the format's ``tensor_scale``: the tensor's own amax, the static one given, or one per row."""
    block_local = fmt.nonfinite is NonFinite.BLOCK
    if fmt.tensor_scale is TensorScale.PER_TOKEN:
        if global_amax is not None:
            raise ValueError("tensor_scale='per_token' computes one global scale per row; a static global_amax "
                             "cannot be combined with it")
        return row_amax(xb, block_local)
    if global_amax is None:
        if fmt.tensor_scale is TensorScale.STATIC:
            raise ValueError("tensor_scale='static' needs a calibrated global_amax (none was given); quarl never "
                             "falls back to a dynamic scale")
        return tensor_amax(xb, block_local)
    if global_amax.numel() != 1:
        raise ValueError(f"global_amax must hold one value (a per-tensor amax), got shape {tuple(global_amax.shape)}")
    return global_amax.to(torch.float32).reshape(1)


def _block_amax(xb: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Per-block amax ``(..., n_blocks, 1)``; with ``block_2d`` the max over 16 rows of each 16x16 tile."""
    amax = xb.abs().amax(dim=-1, keepdim=True)
    if not fmt.block_2d:
        return amax
    if amax.dim() < 3:
        raise ValueError("block_2d needs a tensor with at least 2 dims (rows x 16-col blocks)")
    rows = amax.shape[-3]
    pad = (-rows) % 16
    padded = torch.nn.functional.pad(amax, (0, 0, 0, 0, 0, pad)) if pad else amax
    tiles = padded.reshape(*padded.shape[:-3], (rows + pad) // 16, 16, *padded.shape[-2:])
    tile_max = tiles.amax(dim=-3, keepdim=True).expand_as(tiles)
    return tile_max.reshape(padded.shape)[..., :rows, :, :]


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    return round_to_float_grid(v, E4M3)


def _poison(s8: torch.Tensor, block_amax: torch.Tensor) -> torch.Tensor:
    """NaN scale for blocks holding a non-finite value (see Policies)."""
    return torch.where(torch.isfinite(block_amax), s8, torch.full_like(s8, float("nan")))


def _scales_ct(b: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gs = torch.nan_to_num(T.clamp(min=_FP32_TINY).reciprocal() * _RANGE, nan=1.0, posinf=1.0, neginf=1.0)
    s8 = _e4m3((gs * (b / E2M1.max_normal)).clamp(-E4M3.max_normal, E4M3.max_normal))
    s8 = torch.where(s8 == 0, torch.full_like(s8, 0.125), s8)  # CT _get_dtype_eps(float8_e4m3fn)
    return s8, gs


def _scales_torchao(b: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pts = T / _RANGE
    s8 = _e4m3(((b / E2M1.max_normal) / pts).clamp(_E4M3_TINY, E4M3.max_normal))
    return s8, pts


def _scales_vllm(b: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gs = torch.nan_to_num(T.clamp(min=_FP32_TINY).reciprocal() * _RANGE, nan=1.0, posinf=1.0, neginf=1.0)
    s8 = _e4m3((gs * (b * _SIXTH.to(b.device))).clamp(-E4M3.max_normal, E4M3.max_normal))
    return s8, gs


def _vllm_reciprocal(v: torch.Tensor) -> torch.Tensor:
    """vLLM ``get_reciprocal``: ``1 / (v + 1e8 * [v == 0])`` (a zero maps to fp32(1e-8), never to Inf)."""
    return (v + (v == 0) * 1e8).reciprocal()


def _te_senc(T: torch.Tensor) -> torch.Tensor:
    # TE divides (fp8_max * fp4_max / global_amax); `2688.0 / T` would be `T.reciprocal() * 2688` in torch
    # (Tensor.__rdiv__), 1 ulp off for ~30% of amaxes, which can move a block scale (72 vs 80, see the TE xcheck)
    s_enc = (torch.full_like(T, _RANGE) / T).clamp(max=_FP32_MAX)
    return torch.where((T == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)


def _scales_te(b: torch.Tensor, T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s_enc = _te_senc(T)
    s8 = _e4m3(b * (s_enc * torch.tensor(1.0 / 6.0, dtype=torch.float32)))
    return s8, T


def dequant_scale(scales: torch.Tensor, global_scale: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """fp32 per-block multiplier from stored E4M3 scales and the stored per-tensor scale (profile's product order)."""
    s8 = scales.to(torch.float32)
    g = global_scale.to(torch.float32)
    if fmt.profile in (Profile.COMPRESSED_TENSORS, Profile.VLLM):
        return s8 / g
    if fmt.profile is Profile.TORCHAO:
        return g * s8
    return (s8 * g) * torch.tensor(1.0 / _RANGE, dtype=torch.float32)


def _element_input(xb: torch.Tensor, s8: torch.Tensor, g: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """The tensor handed to the E2M1 rounding, in each reference's arithmetic."""
    if fmt.profile is Profile.COMPRESSED_TENSORS:
        return xb / (s8 / g)
    if fmt.profile is Profile.TORCHAO:
        return xb * (g.reciprocal() / s8)
    if fmt.profile is Profile.VLLM:
        return xb * _vllm_reciprocal(s8 * _vllm_reciprocal(g))
    s_dec = torch.ones_like(g) / _te_senc(g)
    enc = (torch.ones_like(s8) / (s8 * s_dec)).clamp(max=_FP32_MAX)
    return xb * enc


def quantize_blocks(
    xb: torch.Tensor, fmt: QFormat, noise: torch.Tensor | None, global_amax: torch.Tensor | None = None
) -> BlockQuant:
    """Quantize fp32 blocks ``(..., n_blocks, 16)`` to NVFP4 (see the module docstring for the math).

    Args:
        xb: fp32 blocks.
        fmt: an NVFP4 format.
        noise: U[0,1) samples for stochastic rounding, else None.
        global_amax: per-tensor amax to use instead of the tensor's own (a static, calibrated scale); shape ``(1,)``;
            required with ``tensor_scale="static"``, refused with ``"per_token"``.

    Returns:
        BlockQuant; ``global_scale`` is ``(1,)``, or ``(..., 1, 1)`` (one per row) with ``tensor_scale="per_token"``.
    """
    block_local = fmt.nonfinite is NonFinite.BLOCK
    T = _global_amax(xb, fmt, global_amax)
    b = _block_amax(xb, fmt)
    scale_fn = {Profile.COMPRESSED_TENSORS: _scales_ct, Profile.TORCHAO: _scales_torchao,
                Profile.TRANSFORMER_ENGINE: _scales_te, Profile.VLLM: _scales_vllm}[fmt.profile]
    s8, g = scale_fn(b, T)
    if block_local:
        s8 = _poison(s8, b)
    v = _element_input(xb, s8, g, fmt)
    values = round_elem(v, E2M1, fmt.rounding, noise)
    if fmt.profile is Profile.VLLM:  # cast_to_fp4 returns |q| * sign(v): sign(+-0.0) = 0 gives +0.0
        values = torch.where(v == 0, torch.zeros_like(values), values)
    dq = dequant_scale(s8, g, fmt)
    if not block_local:  # NaN multipliers as the positive quiet NaN: the sign of a propagated NaN is backend noise
        dq = torch.where(torch.isnan(dq), torch.full_like(dq, float("nan")), dq)
    return BlockQuant(values, dq, s8.to(torch.float8_e4m3fn), g)
