"""What a deployed KV cache and a low-precision attention kernel do to K, V, Q and P: `KVCacheSpec`, `AttentionSpec`.

These are the ``kv_cache`` and ``attention`` fields of `quarl.inject.InjectionSpec`; `quarl.inject.attention` applies
them. In YAML::

    kv_cache: fp8_e4m3                                  # shorthand for {format: fp8_e4m3}
    kv_cache: {format: nvfp4}                           # E2M1 blocks of 16 along head_dim, static fp32 tensor scale
    kv_cache: {format: int8, scale: head_token}         # dynamic symmetric scale per (token, KV head)
    attention: {format: fp8_e4m3, probs: true}          # FP8 query and FP8 softmax probabilities before P V

Scale granularity (`KVScale`) of keys (after RoPE), values and the query, and the engine each one matches:

    scale       one scale per                 when it is fixed            engine it matches
    tensor      layer (K and V separately)    static (`Calibration`)      vLLM ``kv_cache_dtype="fp8"`` with scalar
                                                                          ``k_scale`` / ``v_scale`` (llm-compressor
                                                                          ``kv_cache_scheme`` strategy ``tensor``)
    head        layer and KV head             static                      vLLM per-attention-head ``k_scale`` /
                                                                          ``v_scale`` (strategy ``attn_head``)
    token       token (all its KV heads)      when the token is written   per-token dynamic KV kernels
    head_token  token and KV head             when the token is written   per-(token, head) INT8 / FP8 KV caches
    block       the format's own blocks       when the token is written   MX / NVFP4 / NF4 KV caches (blocks run
                along head_dim                (NVFP4's fp32 tensor        along head_dim; NVFP4's fp32 tensor scale
                                              scale: static)              is a calibrated constant)

A scale that depends on tokens not generated yet is not a KV cache: a token's stored K / V must not change when
later tokens arrive, so cached decoding equals recomputing the whole sequence. Every granularity above has that
property; a *dynamic* per-tensor scale (amax over the current tensor) does not, and is refused. Static scales come
from `Calibration`: ``unit`` (scale 1.0, vLLM's default when the checkpoint carries no ``k_scale`` / ``v_scale``) or
``first_forward`` (the amax of each layer's first injected forward, then fixed: vLLM's ``calculate_kv_scales=True``).

Probabilities (``attention.probs``): the unnormalised ``P~ = exp(S - rowmax(S))`` in ``(0, 1]`` is scaled by
``probs_scale`` (448: the full E4M3 range, as SageAttention2 does; 1.0: a plain cast), rounded onto the format's
element grid, scaled back, and multiplied by V; the row sum ``l`` that normalises the output is taken from the
unrounded ``P~`` (as FP8 flash-attention kernels keep it in fp32). Kernels subtract a running max per key tile; quarl
uses the row max over all keys, which is the same when one tile holds the whole row.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from quarl import configio


class KVScale(str, enum.Enum):
    """Which elements of K / V / Q (``(B, H, T, D)``) share one scale (see the module docstring's table)."""

    TENSOR = "tensor"  # static: s = T / elem_max per layer, T from `Calibration`
    HEAD = "head"  # static: s_h = T_h / elem_max per layer and KV head
    TOKEN = "token"  # dynamic: s_t = amax over the token's H*D values / elem_max
    HEAD_TOKEN = "head_token"  # dynamic: s_{t,h} = amax over the token's D values in head h / elem_max
    BLOCK = "block"  # the format's own block scales along head_dim (MX, NVFP4, NF4)


class Calibration(str, enum.Enum):
    """Where a static scale (``tensor`` / ``head``, NVFP4's fp32 tensor scale) comes from."""

    UNIT = "unit"  # scale 1.0: T = elem_max (NVFP4: T = 6 * 448); vLLM's default k_scale = v_scale = 1.0
    FIRST_FORWARD = "first_forward"  # T = amax of the first injected forward of each layer, then fixed


STATIC = (KVScale.TENSOR, KVScale.HEAD)
_DYNAMIC_TENSOR_HELP = ("a dynamic per-tensor scale depends on every token of the current forward, so a token's "
                        "stored K/V would change as later tokens arrive (no KV cache works that way); use "
                        "scale='tensor' (static, calibrated), 'head', 'token' or 'head_token'")


def _family(name: str) -> str:
    from quarl.formats import get_format

    return get_format(name).family.value


def _resolve(owner: Any, where: str) -> None:
    """Validate and fill ``format`` / ``scale`` / ``calibration`` / ``options`` of a spec in place (frozen)."""
    set_ = lambda k, v: object.__setattr__(owner, k, v)  # noqa: E731 (frozen dataclass)
    from quarl.formats import FORMATS, get_format

    if not isinstance(owner.format, str) or owner.format not in FORMATS:
        raise configio.unknown_key_error(str(owner.format), FORMATS, f"{where}.format")
    if not isinstance(owner.options, dict):
        raise ValueError(f"{where}.options must be a mapping of quarl.formats options, got {owner.options!r}")
    for key in ("granularity", "tensor_scale"):
        if key in owner.options:
            raise ValueError(f"{where}.options.{key}: the scale granularity is {where}.scale "
                             f"({', '.join(s.value for s in KVScale)})")
    if str(getattr(owner.options.get("rounding"), "value", owner.options.get("rounding"))) == "stochastic":
        raise ValueError(f"{where}: stochastic rounding would store a different K/V for the same token on every "
                         "recomputation (cached decoding != recomputation); use rne")
    family = _family(owner.format)
    scaled = family == "scaled"
    if owner.scale in ("dynamic", "tensor_dynamic", "per_tensor"):
        raise ValueError(f"{where}.scale={owner.scale!r}: {_DYNAMIC_TENSOR_HELP}")
    scale = _enum(KVScale, owner.scale or (KVScale.TENSOR if scaled else KVScale.BLOCK), f"{where}.scale")
    if scaled == (scale is KVScale.BLOCK):
        valid = [s.value for s in KVScale if (s is KVScale.BLOCK) != scaled]
        raise ValueError(f"{where}: format {owner.format!r} ({family}) takes scale in {valid}, got {scale.value!r}")
    static = scale in STATIC or family == "nvfp4"
    if owner.calibration is not None and not static:
        raise ValueError(f"{where}: scale={scale.value!r} with {owner.format!r} has no static scale to calibrate; "
                         "drop calibration")
    calibration = None
    if static:
        integer = scaled and owner.format.startswith("int")
        default = Calibration.FIRST_FORWARD if integer or family == "nvfp4" else Calibration.UNIT
        calibration = _enum(Calibration, owner.calibration or default, f"{where}.calibration")
        if integer and calibration is Calibration.UNIT:
            raise ValueError(f"{where}: a unit scale puts {owner.format} on the integers themselves; use "
                             "calibration='first_forward'")
    get_format(owner.format, **owner.options)  # raises naming the valid options
    set_("scale", scale)
    set_("calibration", calibration)


def _enum(cls: type[enum.Enum], value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    valid = [m.value for m in cls]
    if value not in valid:
        raise configio.unknown_key_error(str(value), valid, where)
    return cls(value)


@dataclass(frozen=True)
class KVCacheSpec:
    """Keys (after RoPE) and values as a quantized KV cache stores them (``injection.kv_cache``)."""

    format: str  # a quarl.formats name: fp8_e4m3 | fp8_e5m2 | int8 | int4 | nvfp4 | mxfp4 | mxfp8_e4m3 | ...
    scale: KVScale | str | None = None  # tensor | head | token | head_token | block (default: tensor, or block)
    calibration: Calibration | str | None = None  # static scales: unit (fp8 default) | first_forward (int, nvfp4)
    options: dict = field(default_factory=dict)  # quarl.formats options (profile, block_size, scale_mode, ...)

    def __post_init__(self) -> None:
        _resolve(self, "kv_cache")

    @classmethod
    def coerce(cls, value: Any, where: str) -> KVCacheSpec | None:
        """None, a spec, a format name (``"fp8_e4m3"``) or a mapping (strict keys) -> a spec or None."""
        return _coerce(cls, value, where)


@dataclass(frozen=True)
class AttentionSpec:
    """Low-precision attention inputs (``injection.attention``): the query and / or the softmax probabilities."""

    format: str = "fp8_e4m3"  # a quarl.formats name for the query and the probabilities
    query: bool = True  # quantize Q (after RoPE) with `scale` / `calibration`, as FP8 attention kernels read it
    scale: KVScale | str | None = None  # the query's scale granularity (as for kv_cache)
    calibration: Calibration | str | None = None  # the query's static scale source
    probs: bool = False  # quantize P~ before P V (runs quarl's eager attention; see the module docstring)
    probs_scale: float = 448.0  # P~ in (0, 1] is multiplied by this before rounding (scaled formats only)
    options: dict = field(default_factory=dict)  # quarl.formats options

    def __post_init__(self) -> None:
        for name in ("query", "probs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"attention.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.probs_scale, bool) or not isinstance(self.probs_scale, (int, float)) \
                or not self.probs_scale > 0:
            raise ValueError(f"attention.probs_scale must be a number > 0, got {self.probs_scale!r}")
        object.__setattr__(self, "probs_scale", float(self.probs_scale))
        if not (self.query or self.probs):
            raise ValueError("attention: query and probs are both false, so nothing would be quantized; "
                             "drop the attention field instead")
        _resolve(self, "attention")
        if self.probs and _family(self.format) not in ("scaled", "mx"):
            raise ValueError(f"attention.probs: {self.format!r} is not supported for probabilities (scaled FP8/INT "
                             "with probs_scale, or MX blocks along the keys)")

    @classmethod
    def coerce(cls, value: Any, where: str) -> AttentionSpec | None:
        """None, a spec, a format name or a mapping (strict keys) -> a spec or None."""
        return _coerce(cls, value, where)


def _coerce(cls: type, value: Any, where: str) -> Any:
    return configio.coerce_block(cls, value, f"InjectionSpec.{where}", "format", "a format name or a mapping")
