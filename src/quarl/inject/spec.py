"""`InjectionSpec`: where, when and what kind of hardware error enters a model.

One frozen dataclass describes an injection in the vocabulary users already know from
hand-rolled verl error-injection forks: ``error_type``, ``injection_point``, ``apply_during``, ``use_ste``, targets /
excludes, ``target_layers``, ``error_scale``, ``seed``. YAML is only its serialized form (`to_yaml` / `from_yaml`,
strict via `quarl.configio`: an unknown key is an error naming the nearest valid key).

Schemes (the names llm-compressor / vLLM users know) expand to explicit fields in ``__post_init__``:

    scheme     error_type  injection_point   note
    W4A16      mxfp4*      weight            * 4-bit format; default mxfp4, or the given 4-bit error_type
    W4A4       mxfp4*      both              * (mxfp4 | nvfp4 | int4 | nf4); weight + linear input
    MXFP4A16   mxfp4       weight
    MXFP4      mxfp4       both
    NVFP4A16   nvfp4       weight
    NVFP4      nvfp4       both
    FP8        fp8_e4m3    both              scaled E4M3 on weights and inputs (compressed-tensors ``FP8``)

Deliberate choice: the generic ``W4A16`` / ``W4A4`` names mean "4-bit weights" / "4-bit weights and inputs" and
default to **MXFP4** (the fork's primary format), NOT compressed-tensors' ``W4A16`` (INT4 group 128): for that, write
``scheme="W4A16", error_type="int4", format_options={"group_size": 128}``. A scheme that contradicts an explicitly
given field (``scheme="NVFP4", error_type="mxfp4"``, ``scheme="W4A16", injection_point="both"``) raises.

Hardware presets (``hardware="nvidia-b200-nvfp4" | "amd-mi355-mxfp4" | "nvidia-h100-fp8"``, `quarl.inject.hardware`)
expand the same way into explicit fields -- format, activation-scale mode, KV cache, attention -- before the scheme.

Field types are checked strictly before anything else: a bool must be a real bool (YAML's quoted ``'false'`` is a
truthy string and would silently turn ``quantize_lm_head`` on), an int is never a bool, a float accepts an int, and
the tuple fields take a list/tuple of their item type (or one bare item). A wrong type raises a ValueError naming the
field, the value and the expected type.

Error models (see `quarl.inject.errors` for the math): any `quarl.formats` name (fake quantization), or
``relative_gaussian`` x·(1 + s·N(0,1)), ``absolute_gaussian`` x + s·N(0,1), ``systematic_bias`` x + s·sign(x),
``deadzone`` (zero where |x| < t·max|x|); ``s`` / ``t`` is ``error_scale`` (required for those, forbidden for formats).

Beyond the linears: ``kv_cache`` (keys after RoPE and values, as a quantized KV cache stores them) and ``attention``
(the query and the softmax probabilities) take a format name or a mapping (`quarl.inject.kvspec`); a spec may set
only those, leaving every linear untouched (``error_type`` None).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quarl import configio
from quarl.inject import hardware, input_scale
from quarl.inject.kvspec import AttentionSpec, KVCacheSpec
from quarl.inject.plan import PrecisionPlan
from quarl.inject.rotation import validate as validate_rotation


class InjectionPoint(enum.Enum):
    """Where the error enters a linear-like layer ``y = x W^T + b``."""

    WEIGHT = "weight"  # W -> e(W): W4A16; cached once per weight version
    INPUT = "input"  # forward pre-hook: x -> e(x)
    OUTPUT = "output"  # forward post-hook: y -> e(y)
    BOTH = "both"  # weight + input: W4A4, y = e(x) e(W)^T + b

    @property
    def weight(self) -> bool:
        return self in (InjectionPoint.WEIGHT, InjectionPoint.BOTH)

    @property
    def input(self) -> bool:
        return self in (InjectionPoint.INPUT, InjectionPoint.BOTH)

    @property
    def output(self) -> bool:
        return self is InjectionPoint.OUTPUT


class Phase(enum.Enum):
    """The phase a forward pass belongs to; set explicitly, never inferred from ``module.training``."""

    ROLLOUT = "rollout"  # generation / evaluation (what the deployed hardware runs)
    TRAINING = "training"  # log-prob + loss forward/backward


class ApplyDuring(enum.Enum):
    """Which phases an injection is active in."""

    ROLLOUT = "rollout"
    TRAINING = "training"
    BOTH = "both"

    def covers(self, phase: Phase) -> bool:
        return self is ApplyDuring.BOTH or self.value == phase.value


NOISE_MODELS = ("relative_gaussian", "absolute_gaussian", "systematic_bias", "deadzone")
SCHEMES: dict[str, dict[str, Any]] = {
    # name: fields it sets; "error_type": None means "any 4-bit format, default mxfp4"
    "W4A16": {"error_type": None, "injection_point": "weight"},
    "W4A4": {"error_type": None, "injection_point": "both"},
    "MXFP4A16": {"error_type": "mxfp4", "injection_point": "weight"},
    "MXFP4": {"error_type": "mxfp4", "injection_point": "both"},
    "NVFP4A16": {"error_type": "nvfp4", "injection_point": "weight"},
    "NVFP4": {"error_type": "nvfp4", "injection_point": "both"},
    "FP8": {"error_type": "fp8_e4m3", "injection_point": "both"},
}
FOUR_BIT_FORMATS = ("mxfp4", "nvfp4", "int4", "nf4")
DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"embed", r"(^|\.)wte$", r"(^|\.)wpe$")


def format_names() -> tuple[str, ...]:
    """The fake-quant format names `quarl.formats` knows (imported lazily: formats is a heavier import)."""
    from quarl.formats import FORMATS

    return tuple(FORMATS)


@dataclass(frozen=True)
class InjectionSpec:
    """A complete, validated description of one error injection (see the module docstring)."""

    scheme: str | None = None  # W4A16 | W4A4 | MXFP4A16 | MXFP4 | NVFP4A16 | NVFP4 | FP8; expands to the fields below
    error_type: str | None = None  # a quarl.formats name or one of NOISE_MODELS
    format_options: dict = field(default_factory=dict)  # quarl.formats.get_format options (+ ste: identity|clipped)
    injection_point: InjectionPoint | str | None = None  # weight | input | output | both (default weight)
    apply_during: ApplyDuring | str = "both"  # rollout | training | both
    use_ste: bool = True  # False cuts the gradient through the error (reproduces the W4A4 failure; logs a warning)
    targets: tuple[str, ...] = ()  # regexes searched in the module's qualified name; empty = every candidate
    target_classes: tuple[str, ...] = ("*Linear",)  # fnmatch patterns on the class name (vLLM *ParallelLinear too)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # regexes on the qualified name; LoRA adapters are always excluded
    target_layers: tuple[int, ...] = ()  # decoder-block indices (…layers.<i>.…); empty = all blocks
    quantize_lm_head: bool = False  # the output head is never touched without this explicit opt-in
    error_scale: float | None = None  # sigma / bias / deadzone threshold for the noise models
    seed: int = 0  # seeds the noise models (one generator per module, derived from seed and module name)
    input_scale: str = "dynamic"  # linear-input scale: dynamic | static (input_amax) | per_token (inject/input_scale.py)
    input_amax: dict = field(default_factory=dict)  # static: {module name: calibrated input amax} (quarl calibrate)
    kv_cache: KVCacheSpec | None = None  # K (after RoPE) and V as a quantized KV cache stores them (kvspec)
    attention: AttentionSpec | None = None  # low-precision query / softmax probabilities (kvspec)
    rotation: str = "none"  # none | block | full: randomized Hadamard on both operands (inject/rotation.py)
    plan: PrecisionPlan | None = None  # per-module full precision / other formats: a preset or rules (inject/plan.py)
    hardware: str | None = None  # named chip + serving stack preset: sets the fields above (inject/hardware.py)

    def __post_init__(self) -> None:
        self._check_types()
        object.__setattr__(self, "kv_cache", KVCacheSpec.coerce(self.kv_cache, "kv_cache"))
        object.__setattr__(self, "attention", AttentionSpec.coerce(self.attention, "attention"))
        object.__setattr__(self, "plan", PrecisionPlan.coerce(self.plan))
        hardware.expand(self)  # writes its fields explicitly (a conflicting explicit field raises)
        self._expand_scheme()
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("injection_point", _enum(InjectionPoint, self.injection_point or "weight", "injection_point"))
        set_("apply_during", _enum(ApplyDuring, self.apply_during, "apply_during"))
        self._validate_error()
        input_scale.validate(self)
        validate_rotation(self)
        if self.plan is not None and self.error_type is None:
            raise ValueError("InjectionSpec.plan overrides the format of injected linears; this spec injects none")
        self._validate_selection()

    # --- types --------------------------------------------------------------------------------------------------
    def _check_types(self) -> None:
        """Strict field types (YAML's quoted 'false' is a string, and a string is truthy: no coercion, ever)."""
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name, kind in _SCALAR_TYPES.items():
            value = getattr(self, name)
            if not (value is None and name in _OPTIONAL) and not _is(value, kind):
                raise _type_error(name, value, kind.__name__ + (" or None" if name in _OPTIONAL else ""))
        if self.error_scale is not None:
            set_("error_scale", float(self.error_scale))
        for name, kind in _TUPLE_TYPES.items():
            set_(name, _tuple_of(name, getattr(self, name), kind))
        if self.format_options is not None and not isinstance(self.format_options, dict):
            raise _type_error("format_options", self.format_options, "a mapping of format options")
        set_("format_options", dict(self.format_options or {}))

    # --- scheme expansion -------------------------------------------------------------------------------------------
    def _expand_scheme(self) -> None:
        if self.scheme is None:
            if self.error_type is None and self.kv_cache is None and self.attention is None:
                raise ValueError("InjectionSpec needs an error_type (e.g. 'mxfp4', 'nvfp4', 'relative_gaussian') "
                                 f"or a scheme ({', '.join(SCHEMES)}), or a kv_cache / attention format")
            return
        if self.scheme not in SCHEMES:
            raise configio.unknown_key_error(self.scheme, SCHEMES, "InjectionSpec.scheme")
        preset = SCHEMES[self.scheme]
        point = self.injection_point.value if isinstance(self.injection_point, InjectionPoint) else self.injection_point
        if point is not None and point != preset["injection_point"]:
            raise ValueError(f"scheme {self.scheme!r} means injection_point={preset['injection_point']!r}, "
                             f"but injection_point={point!r} was given; drop one of them")
        error_type = preset["error_type"]
        if error_type is None:  # generic W4A16 / W4A4
            error_type = self.error_type or "mxfp4"
            if error_type not in FOUR_BIT_FORMATS:
                raise ValueError(f"scheme {self.scheme!r} is a 4-bit scheme; error_type must be one of "
                                 f"{FOUR_BIT_FORMATS}, got {error_type!r}")
        elif self.error_type is not None and self.error_type != error_type:
            raise ValueError(f"scheme {self.scheme!r} means error_type={error_type!r}, but error_type="
                             f"{self.error_type!r} was given; use scheme W4A16/W4A4 with an error_type instead")
        object.__setattr__(self, "error_type", error_type)
        object.__setattr__(self, "injection_point", preset["injection_point"])

    # --- validation -------------------------------------------------------------------------------------------------
    def _validate_error(self) -> None:
        if self.error_type is None:  # KV cache / attention only: no linear is touched
            return
        if self.is_noise:
            if self.format_options:
                raise ValueError(f"format_options apply to quarl.formats error types, not {self.error_type!r}")
            if self.error_scale is None or not self.error_scale > 0:
                raise ValueError(f"error_type {self.error_type!r} needs error_scale > 0, got {self.error_scale}")
            if self.error_type == "deadzone" and not self.error_scale < 1:
                raise ValueError(f"deadzone threshold error_scale is a fraction of max|x| in (0, 1), "
                                 f"got {self.error_scale}")
            return
        names = format_names()
        if self.error_type not in names:
            raise configio.unknown_key_error(self.error_type, names + NOISE_MODELS, "InjectionSpec.error_type")
        if self.error_scale is not None:
            raise ValueError(f"error_scale is for the noise models {NOISE_MODELS}; format {self.error_type!r} "
                             "has no scale knob (use format_options)")
        from quarl.formats import SteMode, get_format

        options = dict(self.format_options)
        ste = options.pop("ste", "identity")
        if ste not in [m.value for m in SteMode] and not isinstance(ste, SteMode):
            raise configio.unknown_key_error(str(ste), [m.value for m in SteMode], "InjectionSpec.format_options.ste")
        get_format(self.error_type, **options)  # raises ValueError naming the valid options

    def _validate_selection(self) -> None:
        for pattern in self.targets + self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r} in targets/exclude: {exc}") from None
        if not self.target_classes:
            raise ValueError("target_classes is empty: no module could ever match (default: ('*Linear',))")
        if any(i < 0 for i in self.target_layers):
            raise ValueError(f"target_layers must be non-negative block indices, got {self.target_layers}")

    # --- derived ----------------------------------------------------------------------------------------------------
    @property
    def is_noise(self) -> bool:
        """True for the gaussian / bias / deadzone models, False for quarl.formats fake quantization."""
        return self.error_type in NOISE_MODELS

    def input_format_options(self) -> dict[str, Any]:
        """Extra ``get_format`` options of the input format for ``input_scale`` (see `quarl.inject.input_scale`)."""
        return input_scale.format_options(self)

    def replace(self, **changes: Any) -> InjectionSpec:
        """A copy with some fields changed (scheme and hardware are dropped: the copy carries the expanded fields)."""
        data = self.to_dict()
        data.update(scheme=None, hardware=None, **changes)
        return InjectionSpec(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (enums as their string values), ready for YAML/JSON."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else configio.to_dict(value)
        return out

    def to_yaml(self, path: str | Path | None = None, header: str | None = None) -> str:
        """Serialize to YAML (optionally writing it with a ``# header`` comment)."""
        return configio.dump_yaml(self.to_dict(), path, header)

    @classmethod
    def from_yaml(cls, source: str | Path) -> InjectionSpec:
        """Load strictly from a YAML file path or string (unknown keys name the nearest valid key)."""
        return configio.load_yaml(cls, source)

    @classmethod
    def from_dict(cls, data: dict) -> InjectionSpec:
        """Build strictly from a dict (unknown keys name the nearest valid key)."""
        return configio.from_dict(cls, data)


_SCALAR_TYPES: dict[str, type] = {"scheme": str, "error_type": str, "use_ste": bool, "quantize_lm_head": bool,
                                  "error_scale": float, "seed": int, "hardware": str}
_OPTIONAL = ("scheme", "error_type", "error_scale", "hardware")
_TUPLE_TYPES: dict[str, type] = {"targets": str, "target_classes": str, "exclude": str, "target_layers": int}


def _is(value: Any, kind: type) -> bool:
    """Strict isinstance: bool only for bool, int never a bool, float accepts int (not bool)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _type_error(name: str, value: Any, expected: str) -> ValueError:
    hint = ""
    if isinstance(value, str) and any(k in expected for k in ("bool", "int", "float")):
        hint = " (YAML reads quoted values, and exponents without a dot such as 1e-3, as strings: write " \
               "true/false unquoted, 1.0e-3)"
    return ValueError(f"InjectionSpec.{name} must be {expected}, got {value!r} ({type(value).__name__}){hint}")


def _tuple_of(name: str, value: Any, kind: type) -> tuple:
    """A tuple of ``kind`` from a list/tuple of them, or from one bare ``kind`` value (``targets="q_proj"``)."""
    if _is(value, kind):
        return (value,)
    if isinstance(value, (list, tuple)) and all(_is(v, kind) for v in value):
        return tuple(value)
    raise _type_error(name, value, f"a list of {kind.__name__} (or a single {kind.__name__})")


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    """Coerce a string (or member) to ``cls``; unknown strings raise naming the nearest valid value."""
    if isinstance(value, cls):
        return value
    valid = [m.value for m in cls]
    if value not in valid:
        raise configio.unknown_key_error(str(value), valid, f"InjectionSpec.{what}")
    return cls(value)
