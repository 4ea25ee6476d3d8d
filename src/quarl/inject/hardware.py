"""Named hardware presets: ``InjectionSpec(hardware="nvidia-b200-nvfp4")`` expands into explicit fields.

A preset is a shortcut for the fields a deployment on that chip and serving stack implies, never hidden behaviour:
`expand` writes them into the spec, so ``spec.to_dict()`` (the resolved config of every run directory) shows each
one. A field given explicitly with another value than the preset's is an error, as for ``scheme``.

    preset              linears (W and A)                     A scale          KV cache          attention
    nvidia-b200-nvfp4   NVFP4 W4A4 (16-blocks, E4M3 x fp32)   static (calib.)  FP8 E4M3, unit    BF16 (none)
    amd-mi355-mxfp4     MXFP4 W4A4 (32-blocks, E8M0, OCP)     per block        FP8 E4M3, unit    BF16 (none)
    nvidia-h100-fp8     FP8 E4M3 W8A8, per-tensor weights     per token        FP8 E4M3, unit    FP8 query, unit

Sources and the reasoning behind every choice are in ``docs/hardware.md``. ``nvidia-b200-nvfp4`` needs calibrated
input amaxes (``input_amax``, written by ``quarl calibrate``), as the checkpoints its kernels serve carry them;
building the spec without them raises.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from quarl import configio

_FP8_KV = {"format": "fp8_e4m3", "scale": "tensor", "calibration": "unit"}  # vLLM kv_cache_dtype="fp8", no scales
# FlashAttention 3 (Hopper) with an FP8 KV cache quantizes the query to FP8 as well (q_scale 1.0 by default)
_FP8_QUERY = {"format": "fp8_e4m3", "query": True, "scale": "tensor", "calibration": "unit", "probs": False}
HARDWARE: dict[str, dict[str, Any]] = {
    "nvidia-b200-nvfp4": {"error_type": "nvfp4", "injection_point": "both", "input_scale": "static",
                          "kv_cache": _FP8_KV, "attention": None},
    "amd-mi355-mxfp4": {"error_type": "mxfp4", "injection_point": "both", "format_options": {"profile": "ocp"},
                        "input_scale": "dynamic", "kv_cache": _FP8_KV, "attention": None},
    "nvidia-h100-fp8": {"error_type": "fp8_e4m3", "injection_point": "both", "input_scale": "per_token",
                        "kv_cache": _FP8_KV, "attention": _FP8_QUERY},
}


def _same(spec: Any, name: str, value: Any) -> bool:
    """True when ``spec.<name>`` already holds the preset's ``value`` (enum members compare by their value)."""
    current = getattr(spec, name)
    current = getattr(current, "value", current)
    if name in ("kv_cache", "attention") and value is not None and current is not None:
        return current == type(current).coerce(value, name)
    return current == value


def _defaults(spec: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(spec):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


def expand(spec: Any) -> None:
    """Write the fields of ``spec.hardware`` into ``spec`` (frozen; called from ``InjectionSpec.__post_init__``
    before the scheme is expanded). A field still at its dataclass default takes the preset value.

    Args:
        spec: the InjectionSpec being built (``kv_cache`` / ``attention`` already coerced).

    Raises:
        ValueError: an unknown preset (naming the nearest), or a field given explicitly with another value.
    """
    if spec.hardware is None:
        return
    if spec.hardware not in HARDWARE:
        raise configio.unknown_key_error(spec.hardware, HARDWARE, "InjectionSpec.hardware")
    defaults = _defaults(spec)
    for name, value in HARDWARE[spec.hardware].items():
        if _same(spec, name, value):
            continue
        current = getattr(spec, name)
        if current != defaults[name]:
            raise ValueError(f"hardware {spec.hardware!r} means {name}={value!r}, but {name}={current!r} was given; "
                             "drop one of them (docs/hardware.md lists every preset's fields)")
        if name in ("kv_cache", "attention") and value is not None:
            value = type_of(name).coerce(value, name)
        object.__setattr__(spec, name, dict(value) if isinstance(value, dict) else value)


def type_of(name: str) -> Any:
    """The spec class of the ``kv_cache`` / ``attention`` field."""
    from quarl.inject.kvspec import AttentionSpec, KVCacheSpec

    return KVCacheSpec if name == "kv_cache" else AttentionSpec


def describe(name: str) -> str:
    """One line per field of preset ``name`` (what ``quarl diagnose`` prints)."""
    return ", ".join(f"{k}={v}" for k, v in HARDWARE[name].items())
