"""Activation-scale modes of the injected linear inputs: how the per-tensor scale of ``e(x)`` is chosen.

``InjectionSpec.input_scale`` says where the input's per-tensor scale comes from, as the deployed kernels do it:

    input_scale  NVFP4 (fp32 global scale)                 FP8 (fp32 per-tensor scale)
    dynamic      T = amax|x| at every call (default)        per the format's granularity (default: per tensor)
    static       T = the module's calibrated input amax     T = the module's calibrated input amax
                 (compressed-tensors ``input_global_scale``  (compressed-tensors ``input_scale`` = T / 448)
                 = 2688 / T, vLLM's W4A4 kernels)
    per_token    one global scale per token row              one scale per token row (granularity per_token)

The calibrated amaxes (``InjectionSpec.input_amax``, one per module name from `quarl.checkpoint.calibrate_spec` /
``quarl calibrate``; PEFT's wrapping of the name is ignored, `canonical`) are bound at attach time; a module
selected by a static spec without a calibrated amax is an error, never a silent dynamic scale. The weights are not
affected: only the linear input takes the mode.

`InputScales` builds each module's input format once and hands out one function per distinct (format, amax), so
modules that read the same tensor with the same scale (q/k/v, gate/up) still share one fake-quantized copy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from quarl import configio

if TYPE_CHECKING:  # spec.py imports this module (validation); the runtime objects arrive as arguments
    from quarl.inject.errors import ErrorModel
    from quarl.inject.spec import InjectionSpec

logger = logging.getLogger(__name__)
INPUT_SCALES = ("dynamic", "static", "per_token")
_PEFT_PREFIX, _PEFT_LAYER = "base_model.model.", ".base_layer"
SCALED_INPUT_FORMATS = ("nvfp4", "fp8_e4m3", "fp8_e5m2")  # the formats with a per-tensor activation scale
Bind = Callable[..., Callable[[torch.Tensor], torch.Tensor]]  # injector.activation_fn(error, generator, global_amax)


def canonical(fqn: str) -> str:
    """A module's name without PEFT's wrapping (``base_model.model.`` prefix, ``.base_layer`` suffix), so amaxes
    calibrated on the plain model serve the LoRA-wrapped one (and the reverse)."""
    if fqn.startswith(_PEFT_PREFIX):
        fqn = fqn[len(_PEFT_PREFIX):]
    return fqn[:-len(_PEFT_LAYER)] if fqn.endswith(_PEFT_LAYER) else fqn


def validate(spec: InjectionSpec) -> None:
    """Check ``spec.input_scale`` / ``spec.input_amax`` (called by ``InjectionSpec.__post_init__``); ``input_amax``
    is normalized to ``{str: float}``.

    Raises:
        ValueError: an unknown mode (naming the nearest), a non-dynamic mode on a format without a per-tensor
            activation scale, on a spec that does not inject the input, static without calibrated amaxes, amaxes
            without static, or an amax that is not a finite number >= 0.
    """
    mode, table = spec.input_scale, spec.input_amax
    if not isinstance(mode, str) or mode not in INPUT_SCALES:
        raise configio.unknown_key_error(str(mode), INPUT_SCALES, "InjectionSpec.input_scale")
    if not isinstance(table, dict):
        raise ValueError(f"InjectionSpec.input_amax must be a mapping {{module name: amax}}, got {table!r}")
    amax = {}
    for name, value in table.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"InjectionSpec.input_amax: {name!r}: {value!r} is not a finite amax >= 0")
        amax[name] = float(value)
    object.__setattr__(spec, "input_amax", amax)
    if "tensor_scale" in spec.format_options:
        raise ValueError("format_options.tensor_scale would also apply to the weights: set input_scale instead")
    if mode == "dynamic":
        if amax:
            raise ValueError("InjectionSpec.input_amax is only read with input_scale='static' (it would be ignored)")
        return
    if spec.error_type not in SCALED_INPUT_FORMATS:
        raise ValueError(f"input_scale={mode!r} chooses the per-tensor activation scale of "
                         f"{' / '.join(SCALED_INPUT_FORMATS)}; {spec.error_type!r} has none (MX and NF4 scale per "
                         "block, the noise models have no scale)")
    if not spec.injection_point.input:
        raise ValueError(f"input_scale={mode!r} applies to the linear input, but injection_point="
                         f"{spec.injection_point.value!r} does not inject it (use 'input' or 'both')")
    if mode == "static" and not amax:
        raise ValueError("input_scale='static' needs calibrated input amaxes (input_amax, one per module): run "
                         "`quarl calibrate` or quarl.checkpoint.calibrate_spec; quarl never falls back to dynamic")
    if mode != "static" and amax:
        raise ValueError(f"InjectionSpec.input_amax is only read with input_scale='static', not {mode!r}")
    gran = spec.format_options.get("granularity")
    gran = getattr(gran, "value", gran)
    wanted = "per_tensor" if mode == "static" else "per_token"
    if spec.error_type != "nvfp4" and gran not in (None, wanted):
        raise ValueError(f"input_scale={mode!r} means granularity={wanted!r} for the FP8 input; format_options "
                         f"say granularity={gran!r}")


def format_options(spec: InjectionSpec) -> dict[str, Any]:
    """The ``get_format`` options that put ``spec.input_scale`` on the input format (on top of format_options)."""
    if spec.input_scale == "dynamic":
        return {}
    if spec.error_type == "nvfp4":
        return {"tensor_scale": spec.input_scale}
    if spec.input_scale == "static":
        return {"tensor_scale": "static", "granularity": "per_tensor"}
    return {"granularity": "per_token"}


def describe(fmt, amax: float | None) -> str:
    """Human-readable scale mode actually applied to an input with format ``fmt`` (None: a noise model)."""
    if fmt is None:
        return "noise model (no scale)"
    family, mode = fmt.family.value, fmt.tensor_scale.value
    if family == "mx":
        return "per-block E8M0 (no tensor scale)"
    if family == "nf4":
        return "per-block absmax (no tensor scale)"
    if mode == "static":
        return f"static (calibrated amax {amax:.6g})"
    if family == "nvfp4":
        return "per-token global scale" if mode == "per_token" else "dynamic per-tensor global scale"
    gran = fmt.granularity.value.replace("_", "-")
    return f"dynamic {gran}"


class InputScales:
    """The input error function of every module under one spec (see the module docstring)."""

    def __init__(self, spec: InjectionSpec, error: ErrorModel, selected: list[tuple[str, torch.nn.Module]]) -> None:
        from quarl.inject.select import is_experts

        experts = [fqn for fqn, module in selected if is_experts(module)]
        if experts and spec.input_scale == "static" and spec.injection_point.input:
            raise ValueError(f"input_scale='static' is not implemented for fused MoE experts "
                             f"({', '.join(experts[:4])}): a static scale per expert needs per-expert calibration; "
                             "exclude them or use input_scale='dynamic' / 'per_token'")
        selected = [fqn for fqn, _ in selected]
        self._amax = {canonical(k): v for k, v in spec.input_amax.items()}
        self.spec = spec
        self.error = error
        self.input_error = error
        if error.fmt is not None and spec.input_scale != "dynamic":
            from quarl.formats import get_format

            self.input_error = dataclasses.replace(error, fmt=get_format(error.fmt, **spec.input_format_options()))
        self._bound: dict[float | None, Callable[[torch.Tensor], torch.Tensor]] = {}
        self.modes: dict[str, str] = {}
        if spec.input_scale == "static" and spec.injection_point.input:
            missing = [fqn for fqn in selected if canonical(fqn) not in self._amax]
            if missing:
                raise ValueError(f"input_scale='static' but {len(missing)} selected modules have no calibrated input "
                                 f"amax in input_amax: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                                 "calibrate them (quarl calibrate) or use input_scale='dynamic' / 'per_token'")
            unused = sorted(set(self._amax) - {canonical(fqn) for fqn in selected})
            if unused:
                logger.warning("quarl.inject: %d calibrated input amaxes belong to no selected module and are unused: "
                               "%s", len(unused), ", ".join(unused[:8]))

    def amax(self, fqn: str) -> float | None:
        """The static amax bound to ``fqn`` (None unless ``input_scale='static'``)."""
        return self._amax[canonical(fqn)] if self.spec.input_scale == "static" else None

    def function(self, fqn: str, bind: Bind, generator) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fqn``'s input error function: ``bind(input_error, amax)`` shared per amax (deterministic formats)."""
        amax = self.amax(fqn)
        self.modes[fqn] = describe(self.input_error.fmt, amax)
        tensor = None if amax is None else torch.tensor([amax], dtype=torch.float32)
        if not self.input_error.deterministic:
            return bind(self.input_error, generator, tensor)
        if amax not in self._bound:
            self._bound[amax] = bind(self.input_error, generator, tensor)
        return self._bound[amax]
