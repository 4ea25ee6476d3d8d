"""Precision plans: which modules keep full precision or take another format (``injection.plan``).

Deployed 4-bit stacks never quantize every linear: verl's NVFP4 QAT keeps the output head, the embeddings and the
MoE routers in BF16; verl's native W4A4 keeps attention and the first 2 / last 4 MLP layers in BF16; FP8 boundary
layers around an NVFP4 body are common. A plan states that on top of an `InjectionSpec`, as ordered rules::

    plan:
      preset: verl-nvfp4-qat                 # optional: rules named after what an engine ships (PRESETS)
      rules:                                 # applied after the preset's, in order; a later rule wins
        - {first: 1, last: 1, format: none}  # the first and last decoder blocks in full precision
        - {kinds: [down_proj], format: fp8_e4m3}
        - {modules: ['\\.q_proj$'], layers: [3], format: none}

A rule matches a module when every criterion it gives holds: ``modules`` (a regex found in the qualified name,
PEFT's ``base_model.model.`` / ``.base_layer`` wrapping dropped, so one plan serves the plain and the LoRA-wrapped
model), ``kinds`` (`KINDS`), and the decoder block, which must be in ``layers`` (negative indices count from the end)
or among the ``first`` / ``last`` N blocks. ``format: none`` keeps the module in full precision (its hooks are not installed);
a format name (+ ``format_options``) quantizes it with that format instead of the spec's, with every other field of
the spec unchanged (injection point, input scale, rotation, STE...).

Nothing is silent: a rule that matches no module of the model raises, and so does a format rule that matches only
modules the spec does not inject (a format cannot reach an embedding or an unselected head), and a plan that leaves
no module quantized. A ``none`` rule may match modules the spec never quantizes (the head, embeddings, routers): the
presets say so explicitly. `Injector.formats` reports, per module, the format actually applied.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quarl import configio

if TYPE_CHECKING:  # spec.py imports this module (PrecisionPlan); the runtime objects arrive as arguments
    from quarl.inject.errors import ErrorModel
    from quarl.inject.spec import InjectionSpec

logger = logging.getLogger(__name__)
FULL_PRECISION = "none"
KINDS = ("attention", "mlp", "down_proj", "lm_head", "embeddings", "router")
_ATTENTION = {"self_attn", "attn", "attention", "self_attention", "cross_attn"}
_MLP = {"mlp", "feed_forward", "ffn", "block_sparse_moe"}
_DOWN = {"down_proj", "w2", "fc2"}


@dataclass(frozen=True)
class PlanRule:
    """One override: the modules it matches take ``format`` (see the module docstring)."""

    modules: tuple[str, ...] = ()  # regexes searched in the qualified name
    kinds: tuple[str, ...] = ()  # attention | mlp | down_proj | lm_head | embeddings | router
    layers: tuple[int, ...] = ()  # decoder-block indices; negative ones count from the end (-1 = last)
    first: int = 0  # the first N decoder blocks
    last: int = 0  # the last N decoder blocks
    format: str = FULL_PRECISION  # none (full precision) | a quarl.formats name
    format_options: dict = field(default_factory=dict)  # quarl.formats options of ``format``

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name, kind in (("modules", str), ("kinds", str), ("layers", int)):
            set_(name, _tuple_of(name, getattr(self, name), kind))
        for name in ("first", "last"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"plan rule: {name} must be an int >= 0, got {value!r}")
        for kind in self.kinds:
            if kind not in KINDS:
                raise configio.unknown_key_error(kind, KINDS, "plan rule kinds")
        for pattern in self.modules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"plan rule: invalid regex {pattern!r} in modules: {exc}") from None
        if not (self.modules or self.kinds or self.layers or self.first or self.last):
            raise ValueError("plan rule: give at least one of modules, kinds, layers, first, last (a rule matching "
                             "every module is the spec itself)")
        if not isinstance(self.format_options, dict):
            raise ValueError(f"plan rule: format_options must be a mapping, got {self.format_options!r}")
        if self.format == FULL_PRECISION:
            if self.format_options:
                raise ValueError("plan rule: format_options given with format 'none' (full precision)")
            return
        from quarl.formats import FORMATS

        if not isinstance(self.format, str) or self.format not in FORMATS:
            raise configio.unknown_key_error(str(self.format), (FULL_PRECISION, *FORMATS), "plan rule format")

    def describe(self) -> str:
        """Short text of the rule, e.g. ``first 1, last 1 -> none``."""
        parts = [f"{k} {getattr(self, k)}" for k in ("modules", "kinds", "layers") if getattr(self, k)]
        parts += [f"{k} {getattr(self, k)}" for k in ("first", "last") if getattr(self, k)]
        return ", ".join(parts) + f" -> {self.format}"

    def blocks(self, n_blocks: int) -> set[int] | None:
        """The decoder blocks the rule names (None: it names none, so it does not constrain the block)."""
        if not (self.layers or self.first or self.last):
            return None
        out = {i if i >= 0 else n_blocks + i for i in self.layers}
        out |= set(range(min(self.first, n_blocks))) | set(range(max(n_blocks - self.last, 0), n_blocks))
        return out


def _tuple_of(name: str, value: Any, kind: type) -> tuple:
    ok = lambda v: isinstance(v, kind) and not isinstance(v, bool)  # noqa: E731
    if ok(value):
        return (value,)
    if isinstance(value, (list, tuple)) and all(ok(v) for v in value):
        return tuple(value)
    raise ValueError(f"plan rule: {name} must be a list of {kind.__name__}, got {value!r}")


PRESETS: dict[str, tuple[PlanRule, ...]] = {
    # verl's NVFP4 QAT recipe: the output head, the embeddings and the MoE routers stay BF16
    "verl-nvfp4-qat": (PlanRule(kinds=("lm_head", "embeddings", "router")),),
    # verl's native W4A4 MoE recipe: attention and the first 2 / last 4 MLP layers stay BF16
    "verl-w4a4-moe": (PlanRule(kinds=("attention",)), PlanRule(kinds=("mlp",), first=2, last=4)),
}


@dataclass(frozen=True)
class PrecisionPlan:
    """``injection.plan``: a preset and / or rules (see the module docstring)."""

    preset: str | None = None  # a PRESETS name; its rules come first
    rules: tuple[PlanRule, ...] = ()  # applied in order after the preset's; a later rule wins

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise configio.unknown_key_error(str(self.preset), PRESETS, "InjectionSpec.plan.preset")
        rules = self.rules if isinstance(self.rules, (list, tuple)) else (self.rules,)
        rules = tuple(r if isinstance(r, PlanRule) else configio.from_dict(PlanRule, r, "InjectionSpec.plan.rules")
                      for r in rules)
        object.__setattr__(self, "rules", rules)
        if not self.preset and not rules:
            raise ValueError("InjectionSpec.plan needs a preset or at least one rule")

    def all_rules(self) -> tuple[PlanRule, ...]:
        """The preset's rules, then the plan's own."""
        return (PRESETS[self.preset] if self.preset else ()) + self.rules

    @classmethod
    def coerce(cls, value: Any, where: str = "plan") -> PrecisionPlan | None:
        """None, a plan, a preset name (``"verl-nvfp4-qat"``) or a mapping (strict keys) -> a plan or None."""
        return configio.coerce_block(cls, value, f"InjectionSpec.{where}", "preset",
                                     f"a preset name ({', '.join(PRESETS)}) or a mapping")


# --- matching -------------------------------------------------------------------------------------------------------
def _parts(fqn: str) -> list[str]:
    """Name components, a PEFT ``base_layer`` leaf dropped (``…down_proj.base_layer`` is a ``down_proj``)."""
    parts = fqn.split(".")
    return parts[:-1] if parts[-1] == "base_layer" and len(parts) > 1 else parts


def module_kinds(model: nn.Module, module: nn.Module, fqn: str) -> set[str]:
    """The `KINDS` a module belongs to."""
    from quarl.inject.select import _is_embedding, _is_head, is_router, output_head

    parts = _parts(fqn)
    kinds = set()
    if _ATTENTION & set(parts[:-1]):
        kinds.add("attention")
    if _MLP & set(parts[:-1]):
        kinds.add("mlp")
    if parts[-1] in _DOWN:
        kinds.add("down_proj")
    if _is_head(module, fqn, output_head(model)):
        kinds.add("lm_head")
    if _is_embedding(module):
        kinds.add("embeddings")
    if is_router(module, fqn):
        kinds.add("router")
    return kinds


def _candidates(model: nn.Module, selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Every module a rule may name: the selected ones and any other owner of a >= 2-D parameter (not an adapter)."""
    from quarl.inject.select import is_lora_adapter

    picked = {fqn for fqn, _ in selected}
    others = [(fqn, m) for fqn, m in model.named_modules() if fqn not in picked and not is_lora_adapter(fqn)
              and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    return list(selected) + others


def _n_blocks(model: nn.Module) -> int:
    from quarl.inject.select import block_index

    found = [block_index(fqn) for fqn, _ in model.named_modules()]
    found = [i for i in found if i is not None]
    return max(found) + 1 if found else 0


def canonical(fqn: str) -> str:
    """The name ``modules`` regexes see: PEFT's wrapping dropped (`quarl.inject.input_scale.canonical`), so a plan
    written for the plain model applies to the LoRA-wrapped one."""
    from quarl.inject.input_scale import canonical as strip_peft

    return strip_peft(fqn)


def _matches(rule: PlanRule, model: nn.Module, fqn: str, module: nn.Module, blocks: set[int] | None) -> bool:
    from quarl.inject.select import block_index

    if rule.modules and not any(re.search(p, canonical(fqn)) for p in rule.modules):
        return False
    if rule.kinds and not set(rule.kinds) & module_kinds(model, module, fqn):
        return False
    return blocks is None or block_index(fqn) in blocks


# --- resolution -----------------------------------------------------------------------------------------------------
class ModuleFormats:
    """Each injected module's error model and input function under a spec and its plan (built by `resolve`).

    Attributes:
        selected: the ``(fqn, module)`` pairs that are injected (the spec's selection minus full-precision ones).
        applied: per module the plan or spec touched, the format actually applied: a format name, or
            ``"none (plan rule i: ...)"`` for modules kept in full precision.
    """

    def __init__(self, groups: list[tuple[InjectionSpec, list[tuple[str, nn.Module]]]],
                 applied: dict[str, str], order: list[str]) -> None:
        from quarl.inject.errors import ErrorModel
        from quarl.inject.input_scale import InputScales

        self.applied = applied
        self._groups: list[tuple[ErrorModel, list[tuple[str, nn.Module]]]] = []
        self._error: dict[str, ErrorModel] = {}
        self._scales: dict[str, InputScales] = {}
        for spec, members in groups:
            if spec.input_scale == "static" and len(groups) > 1:  # each format binds its own modules' amaxes
                names = {canonical(fqn) for fqn, _ in members}  # input_amax keys are canonical names
                spec = spec.replace(input_amax={k: v for k, v in spec.input_amax.items() if k in names})
            error = ErrorModel.from_spec(spec)
            scales = InputScales(spec, error, members)
            self._groups.append((error, members))
            for fqn, _ in members:
                self._error[fqn], self._scales[fqn] = error, scales
        rank = {fqn: i for i, fqn in enumerate(order)}  # the selection's own (named_modules) order
        self.selected = sorted((m for _, ms in groups for m in ms), key=lambda m: rank[m[0]])

    def error(self, fqn: str) -> ErrorModel:
        """The error model of injected module ``fqn``."""
        return self._error[fqn]

    def groups(self) -> list[tuple[ErrorModel, list[tuple[str, nn.Module]]]]:
        """``(error model, its modules)`` per distinct format."""
        return list(self._groups)

    def function(self, fqn: str, bind: Callable, generator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fqn``'s input error function (`quarl.inject.input_scale.InputScales.function` of its format)."""
        return self._scales[fqn].function(fqn, bind, generator)

    @property
    def modes(self) -> dict[str, str]:
        """The activation-scale mode bound per module (`InputScales.modes`)."""
        out: dict[str, str] = {}
        for scales in {id(s): s for s in self._scales.values()}.values():
            out.update(scales.modes)
        return out


def resolve(model: nn.Module, spec: InjectionSpec, selected: list[tuple[str, nn.Module]]) -> ModuleFormats:
    """Apply ``spec.plan`` to the spec's selection.

    Args:
        model: the root model.
        spec: the validated spec (its plan may be None: one format for every selected module).
        selected: `quarl.inject.select.select_modules` of ``spec``.

    Raises:
        ValueError: a rule that matches no module of the model; a format rule that matches no injected module; a
            plan that keeps every selected module in full precision; a rule format the spec's other fields refuse.
    """
    if spec.plan is None:
        return ModuleFormats([(spec, list(selected))], {fqn: spec.error_type for fqn, _ in selected},
                             [fqn for fqn, _ in selected])
    rules = spec.plan.all_rules()
    n_blocks = _n_blocks(model)
    candidates = _candidates(model, selected)
    picked = {fqn for fqn, _ in selected}
    winner: dict[str, int] = {}
    for i, rule in enumerate(rules):
        blocks = rule.blocks(n_blocks)
        if blocks is not None and not n_blocks:
            raise ValueError(f"plan rule {i} ({rule.describe()}) names decoder blocks, but {type(model).__name__} "
                             "has no …layers.<i>… modules")
        hits = [fqn for fqn, m in candidates if _matches(rule, model, fqn, m, blocks)]
        if not hits:
            raise ValueError(f"plan rule {i} ({rule.describe()}) matches no module of {type(model).__name__} "
                             f"({n_blocks} decoder blocks); fix or drop the rule")
        if rule.format != FULL_PRECISION and not picked.intersection(hits):
            raise ValueError(f"plan rule {i} ({rule.describe()}) matches only modules the spec does not inject "
                             f"({', '.join(hits[:4])}); a plan can change the format of injected modules only")
        for fqn in hits:
            winner[fqn] = i
    applied: dict[str, str] = {}
    groups: dict[tuple, tuple[InjectionSpec, list]] = {}
    for fqn, module in candidates:
        i = winner.get(fqn)
        rule = rules[i] if i is not None else None
        if fqn not in picked:
            if rule is not None:  # a none rule on a module the spec never injects (head, embeddings, router)
                applied[fqn] = f"{FULL_PRECISION} (plan rule {i}: {rule.describe()}; not injected by the spec)"
            continue
        if rule is not None and rule.format == FULL_PRECISION:
            applied[fqn] = f"{FULL_PRECISION} (plan rule {i}: {rule.describe()})"
            continue
        fmt, options = (rule.format, rule.format_options) if rule else (spec.error_type, spec.format_options)
        key = (fmt, repr(sorted(options.items())))
        if key not in groups:
            groups[key] = (_rule_spec(spec, rule, i) if rule else spec, [])
        groups[key][1].append((fqn, module))
        applied[fqn] = fmt
    if not groups:
        raise ValueError(f"the plan keeps every one of the {len(picked)} selected modules in full precision: nothing "
                         "would be quantized")
    kept = [fqn for fqn in picked if applied[fqn].startswith(FULL_PRECISION)]
    other = [fqn for fqn in picked if fqn not in kept and applied[fqn] != spec.error_type]
    logger.info("quarl.inject: plan (%d rules) keeps %d of %d selected modules in full precision, %d in another "
                "format", len(rules), len(kept), len(picked), len(other))
    return ModuleFormats(list(groups.values()), applied, [fqn for fqn, _ in selected])


def _rule_spec(spec: InjectionSpec, rule: PlanRule, i: int) -> InjectionSpec:
    """The spec with the rule's format (every other field kept; the plan dropped)."""
    try:
        return spec.replace(error_type=rule.format, format_options=dict(rule.format_options), plan=None)
    except ValueError as exc:
        raise ValueError(f"plan rule {i} ({rule.describe()}): {exc}") from None


def parameter_share(selected: list[tuple[str, nn.Module]], names: set[str]) -> float:
    """The share of the selected modules' >= 2-D parameters that ``names`` hold (the cost of a plan)."""
    sizes = {fqn: sum(p.numel() for p in m.parameters(recurse=False) if p.dim() >= 2) for fqn, m in selected}
    total = sum(sizes.values())
    return sum(n for fqn, n in sizes.items() if fqn in names) / total if total else 0.0

