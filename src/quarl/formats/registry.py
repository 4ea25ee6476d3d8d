"""Format names, option enums and the validated, frozen :class:`QFormat` returned by :func:`get_format`.

Why: the format is chosen by name in YAML/CLI (``"nvfp4"``), but the numerics must never branch on free strings
(modes are enums, never bare strings). ``get_format`` turns a name plus options into a frozen dataclass of enums and
rejects anything unknown with the list of valid choices: a silently ignored option makes an experiment report a setting
it never ran.

Every enum member's docstring gives its formula; the per-family math lives in ``mx.py``, ``nvfp4.py``, ``scaled.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from quarl.configio import nearest

from .rounding import RoundingMode
from .spec import E2M1, E2M3, E3M2, E4M3, E5M2, INT4, INT8, MXINT8_ELEM, FloatSpec, IntSpec


class Family(str, Enum):
    """How a format derives its scales."""

    MX = "mx"
    """OCP MX: one E8M0 power-of-two scale per ``block_size`` (32) elements."""
    NVFP4 = "nvfp4"
    """E2M1 elements, one E4M3 scale per 16 elements, times one fp32 per-tensor scale."""
    SCALED = "scaled"
    """FP8 / INT elements with an fp32 absmax scale per tensor, channel, token or group."""
    NF4 = "nf4"
    """bitsandbytes NF4: 16 fixed levels in [-1, 1] times an fp32 absmax per 64-element block."""


class ScaleMode(str, Enum):
    """MX shared-scale rule from the block ``amax`` (``P`` = emax of the element grid, ``be``/``m`` = fp32 bits).

    All are computed from fp32 bits, never ``log2`` (float32 ``log2`` is not exact near powers of two); the unbiased
    exponent is clamped to [-127, 127] and stored biased by 127.
    """

    FLOOR = "floor"
    """``s = be - 127 - P`` = floor(log2 amax) - P (OCP MX v1.0 §6.3; torchao FLOOR; saturates [6, 8)*2^s for FP4)."""
    CEIL = "ceil"
    """``s = be - 127 + (m != 0) - P`` (torchao CEIL)."""
    EVEN = "even"
    """``amax_bits += 1 << (22 - mbits)``, mantissa masked off, then FLOOR (torchao EVEN; compressed-tensors with its
    fixed mantissa width when ``profile="compressed_tensors"``)."""
    RCEIL = "rceil"
    """``s = ceil(log2(amax * (1 / max_normal)))`` taken from bits: exponent + 1 if any mantissa bit is set, fp32
    subnormals exact (<= 2^-127 -> byte 0, else byte 1) (torchao main ``_f32_to_e8m0_rceil``, PTX ``cvt.rp.ue8m0``)."""


class Profile(str, Enum):
    """Which reference a format reproduces where the references disagree (docs/formats.md)."""

    OCP = "ocp"
    """MX per the OCP spec as torchao main implements it (default for MX)."""
    COMPRESSED_TENSORS = "compressed_tensors"
    """compressed-tensors 0.20 / llm-compressor / vLLM (default for NVFP4, FP8, INT)."""
    TORCHAO = "torchao"
    """torchao ``nvfp4_quantize`` two-level (NVFP4 only)."""
    TRANSFORMER_ENGINE = "transformer_engine"
    """TransformerEngine NVFP4BlockScaling, transcribed from its reference (NVFP4 only; not run here)."""
    BITSANDBYTES = "bitsandbytes"
    """bitsandbytes NF4 (NF4 only)."""
    VLLM = "vllm"
    """vLLM's NVFP4 emulation reference (``ref_nvfp4_quant_dequant``, its CPU path), with the per-tensor scale that
    compressed-tensors stores as ``input_global_scale`` (NVFP4 only; differences from ``compressed_tensors`` are
    listed in ``nvfp4.py`` and docs/formats-vllm.md)."""


class TensorScale(str, Enum):
    """Where the per-tensor scale of an activation comes from (NVFP4's fp32 global scale; FP8's per-tensor scale).

    ``T`` below is the amax that the format's per-tensor formula turns into its scale (NVFP4 compressed_tensors:
    ``gs = 2688 / T``; FP8: ``scale = T / 448``).
    """

    DYNAMIC = "dynamic"
    """``T = amax|x|`` over the whole tensor at every call (quarl's default; what a dynamic-activation kernel does)."""
    STATIC = "static"
    """``T`` is a calibrated constant passed as ``global_amax=`` (compressed-tensors' ``input_global_scale`` /
    ``input_scale``, vLLM's W4A4 kernels); calling without one raises ``ValueError`` (never a silent dynamic scale).
    FP8: needs ``granularity="per_tensor"``."""
    PER_TOKEN = "per_token"
    """NVFP4 only: one fp32 global scale per row, ``T_r = amax|x_r|`` over the block axis (every other index fixed),
    through the profile's own per-tensor formula; ``QuantizedTensor.global_scale`` then holds one value per row.
    (FP8 per-token scaling is ``granularity="per_token"``.)"""


class NonFinite(str, Enum):
    """What a NaN or +-Inf in the input does to an NVFP4 tensor (MX and the scaled formats are always block-local).

    NVFP4 takes a per-tensor amax, so a non-finite value can reach every block through it; the references differ.
    """

    REFERENCE = "reference"
    """Reproduce the profile's reference (default): the per-tensor amax is taken over every element (NaN / Inf
    included) and each profile's own arithmetic runs on it. compressed_tensors: an Inf makes the whole tensor NaN
    (gs = 0), a NaN gives gs = 1 (``nan_to_num``) and a NaN block; torchao: either makes the whole tensor NaN;
    transformer_engine (its PyTorch reference): a NaN makes the whole tensor NaN, an Inf gives S_enc = 1 and every
    block an infinite dequantization scale (+-Inf / NaN everywhere). Details in ``nvfp4.py``."""
    BLOCK = "block"
    """quarl's block-local policy: the per-tensor amax is taken over the finite elements and only the block holding
    the NaN / Inf dequantizes to NaN; every other block is exactly as without it."""


class Granularity(str, Enum):
    """Which elements share one scale (SCALED formats)."""

    PER_TENSOR = "per_tensor"
    """One scale for the whole tensor."""
    PER_CHANNEL = "per_channel"
    """One scale per row: amax over ``axis`` (a weight ``[out, in]`` gets one scale per output channel)."""
    PER_TOKEN = "per_token"
    """Same reduction as PER_CHANNEL (amax over the last axis), named for activations ``[..., T, H]``."""
    PER_GROUP = "per_group"
    """One scale per ``group_size`` contiguous elements along ``axis``."""


class SteMode(str, Enum):
    """Backward rule of :func:`fake_quantize`."""

    IDENTITY = "identity"
    """``dL/dx = dL/dy`` (straight-through estimator)."""
    CLIPPED = "clipped"
    """``dL/dx = dL/dy * [|x| <= max_elem * block_scale]``: zero where the value saturated."""


# TransformerEngine get_wgrad_sign_vector(): the fixed sign vector of its 16-wide random Hadamard transform.
TE_HADAMARD_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


@dataclass(frozen=True)
class QFormat:
    """A fully resolved, validated format. Build it with :func:`get_format`, not directly."""

    name: str
    family: Family
    elem: FloatSpec | IntSpec | None  # None for NF4 (lookup table)
    block_size: int  # elements per scale along ``axis``; 0 = the whole axis (per-channel) or tensor
    axis: int = -1
    scale_mode: ScaleMode = ScaleMode.FLOOR  # MX only
    rounding: RoundingMode = RoundingMode.NEAREST_EVEN
    profile: Profile = Profile.OCP
    granularity: Granularity = Granularity.PER_GROUP
    seed: int | None = None  # stochastic rounding: fresh torch.Generator(seed) per call unless a generator is passed
    hadamard: bool = False  # 16-wide random Hadamard pre-rotation along ``axis``
    hadamard_signs: tuple[int, ...] = TE_HADAMARD_SIGNS
    block_2d: bool = False  # NVFP4: one scale per 16x16 tile of the last two dims (TE weight recipe)
    nonfinite: NonFinite = NonFinite.BLOCK  # NVFP4: REFERENCE (its default) or BLOCK; other families: block-local
    tensor_scale: TensorScale = TensorScale.DYNAMIC  # NVFP4 global / FP8 tensor scale source

    @property
    def elem_max(self) -> float:
        """Largest element magnitude (NF4: 1.0)."""
        return 1.0 if self.elem is None else self.elem.max_normal


_FAMILY_OPTIONS = {
    Family.MX: {"block_size", "axis", "scale_mode", "rounding", "profile", "seed", "hadamard", "hadamard_signs"},
    Family.NVFP4: {"block_size", "axis", "rounding", "profile", "seed", "hadamard", "hadamard_signs", "block_2d",
                   "nonfinite", "tensor_scale"},
    Family.SCALED: {"granularity", "group_size", "axis", "rounding", "seed", "profile", "hadamard", "hadamard_signs",
                    "tensor_scale"},
    Family.NF4: {"block_size", "axis", "profile"},
}
_FAMILY_PROFILES = {
    Family.MX: (Profile.OCP, Profile.COMPRESSED_TENSORS),
    Family.NVFP4: (Profile.COMPRESSED_TENSORS, Profile.TORCHAO, Profile.TRANSFORMER_ENGINE, Profile.VLLM),
    Family.SCALED: (Profile.COMPRESSED_TENSORS,),
    Family.NF4: (Profile.BITSANDBYTES,),
}
# compressed-tensors' MX scale rounding exists for its three MX schemes only (mxfp_utils._MX_ELEM_OFFSET).
_CT_MX = ("mxfp4", "mxfp6_e2m3", "mxfp8_e4m3")


def _mx(name: str, elem: FloatSpec | IntSpec) -> QFormat:
    return QFormat(name, Family.MX, elem, block_size=32)


def _scaled(name: str, elem: FloatSpec | IntSpec, gran: Granularity, block: int) -> QFormat:
    return QFormat(name, Family.SCALED, elem, block_size=block, granularity=gran,
                   profile=Profile.COMPRESSED_TENSORS)


FORMATS: dict[str, QFormat] = {
    "mxfp4": _mx("mxfp4", E2M1),
    "mxfp6_e2m3": _mx("mxfp6_e2m3", E2M3),
    "mxfp6_e3m2": _mx("mxfp6_e3m2", E3M2),
    "mxfp8_e4m3": _mx("mxfp8_e4m3", E4M3),
    "mxfp8_e5m2": _mx("mxfp8_e5m2", E5M2),
    "mxint8": _mx("mxint8", MXINT8_ELEM),
    "nvfp4": QFormat("nvfp4", Family.NVFP4, E2M1, block_size=16, profile=Profile.COMPRESSED_TENSORS,
                     nonfinite=NonFinite.REFERENCE),
    "fp8_e4m3": _scaled("fp8_e4m3", E4M3, Granularity.PER_TENSOR, 0),
    "fp8_e5m2": _scaled("fp8_e5m2", E5M2, Granularity.PER_TENSOR, 0),
    "int8": _scaled("int8", INT8, Granularity.PER_CHANNEL, 0),
    "int4": _scaled("int4", INT4, Granularity.PER_GROUP, 128),
    "nf4": QFormat("nf4", Family.NF4, None, block_size=64, profile=Profile.BITSANDBYTES),
}  # defaults, read-only by convention: derive variants with get_format(name, **options)


def _choice(enum_cls: type[Enum], value: Any, option: str) -> Enum:
    """Enum member from a member or its string value; ValueError listing the valid values otherwise."""
    if isinstance(value, enum_cls):
        return value
    valid = [m.value for m in enum_cls]
    if isinstance(value, str) and value in valid:
        return enum_cls(value)
    hint = nearest(str(value), valid)
    extra = f" (did you mean {hint!r}?)" if hint else ""
    raise ValueError(f"invalid {option}={value!r}{extra}; valid values: {', '.join(valid)}")


def _positive_int(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{option} must be a positive int, got {value!r}")
    return value


def _signs(value: Any) -> tuple[int, ...]:
    signs = tuple(int(s) for s in value)
    if len(signs) != 16 or any(s not in (1, -1) for s in signs):
        raise ValueError(f"hadamard_signs must be 16 values in {{+1, -1}}, got {value!r}")
    return signs


def _apply_option(fmt: QFormat, key: str, value: Any) -> QFormat:
    """Return ``fmt`` with one validated option applied."""
    if key == "block_size":
        return replace(fmt, block_size=_positive_int(value, key))
    if key == "group_size":
        return replace(fmt, block_size=_positive_int(value, key))
    if key == "axis":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"axis must be an int, got {value!r}")
        return replace(fmt, axis=value)
    if key == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"seed must be an int or None, got {value!r}")
        return replace(fmt, seed=value)
    if key in ("hadamard", "block_2d"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a bool, got {value!r}")
        return replace(fmt, **{key: value})
    if key == "hadamard_signs":
        return replace(fmt, hadamard_signs=_signs(value))
    enums = {"scale_mode": ScaleMode, "rounding": RoundingMode, "profile": Profile, "granularity": Granularity,
             "nonfinite": NonFinite, "tensor_scale": TensorScale}
    return replace(fmt, **{key: _choice(enums[key], value, key)})


def _check_consistency(fmt: QFormat, options: dict[str, Any]) -> QFormat:
    """Cross-option rules (profile vs family, granularity vs group size, 2-D blocks)."""
    if fmt.profile not in _FAMILY_PROFILES[fmt.family]:
        valid = ", ".join(p.value for p in _FAMILY_PROFILES[fmt.family])
        raise ValueError(f"{fmt.name}: invalid profile={fmt.profile.value!r}; valid profiles: {valid}")
    if fmt.family is Family.MX and fmt.profile is Profile.COMPRESSED_TENSORS:
        if fmt.name not in _CT_MX:
            raise ValueError(f"profile='compressed_tensors' exists only for {', '.join(_CT_MX)}, not {fmt.name}")
        if "scale_mode" in options and fmt.scale_mode is not ScaleMode.EVEN:
            raise ValueError("profile='compressed_tensors' fixes scale_mode='even' (its round_to_power_2)")
        fmt = replace(fmt, scale_mode=ScaleMode.EVEN)
    if fmt.family is Family.SCALED:
        gran = fmt.granularity
        if "group_size" in options and gran is not Granularity.PER_GROUP:
            raise ValueError(f"group_size needs granularity='per_group', got {gran.value!r}")
        if gran is Granularity.PER_GROUP and fmt.block_size == 0:
            fmt = replace(fmt, block_size=128)
        if gran is not Granularity.PER_GROUP:
            fmt = replace(fmt, block_size=0)
    if fmt.block_2d and fmt.block_size != 16:
        raise ValueError("block_2d (16x16 tiles) needs block_size=16")
    if fmt.tensor_scale is TensorScale.PER_TOKEN and fmt.family is not Family.NVFP4:
        raise ValueError("tensor_scale='per_token' is NVFP4's per-row global scale; FP8 / INT scale per token with "
                         "granularity='per_token'")
    if fmt.tensor_scale is TensorScale.PER_TOKEN and fmt.block_2d:
        raise ValueError("tensor_scale='per_token' (one global scale per row) cannot combine with block_2d tiles")
    if (fmt.tensor_scale is TensorScale.STATIC and fmt.family is Family.SCALED
            and fmt.granularity is not Granularity.PER_TENSOR):
        raise ValueError(f"tensor_scale='static' is one calibrated per-tensor scale: it needs granularity="
                         f"'per_tensor', got {fmt.granularity.value!r}")
    return fmt


def get_format(name: str | QFormat, **options: Any) -> QFormat:
    """Resolve a format name (or a QFormat) plus options into a validated, frozen :class:`QFormat`.

    Args:
        name: one of ``FORMATS`` (e.g. ``"mxfp4"``, ``"nvfp4"``), or a QFormat to modify.
        **options: family-specific options, see the ``quarl.formats`` module docstring. Enum options accept the enum
            member or its string value (``scale_mode="rceil"``).

    Returns:
        The QFormat.

    Raises:
        ValueError: unknown format name, unknown option for the family, or invalid value; the message lists the
            valid choices.
    """
    if isinstance(name, QFormat):
        fmt = name
    elif name in FORMATS:
        fmt = FORMATS[name]
    else:
        hint = nearest(str(name), FORMATS)
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ValueError(f"unknown format {name!r}{extra}; valid formats: {', '.join(FORMATS)}")
    allowed = _FAMILY_OPTIONS[fmt.family]
    for key, value in options.items():
        if key not in allowed:
            hint = nearest(key, allowed)
            extra = f" (did you mean {hint!r}?)" if hint else ""
            raise ValueError(f"unknown option {key!r} for {fmt.name}{extra}; valid options: {', '.join(sorted(allowed))}")
        fmt = _apply_option(fmt, key, value)
    return _check_consistency(fmt, options)
