"""Layer sensitivity scan: inject one layer (or one decoder block) at a time and rank by the damage it causes.

For every unit u (a selected module, or a block index) the spec is narrowed to u alone
(``targets=(^fqn$,)`` or ``target_layers=(i,)``), attached, and the logits are compared with the clean model's:
KL(p_clean ‖ p_u), top-1 agreement and, with reference answers, per-token NLL. Units are ranked by KL.

Noise mode re-runs the same scan with controlled ``relative_gaussian`` noise instead of the format: with
``noise_scale=None`` each unit gets the relative error its quantization actually produced (measured by the main
diagnosis), so the two scans differ only in the *structure* of the error (block scales, saturation, flushed zeros)
and not its size; a layer that is far more damaged by quantization than by equal-size noise points at the format
(outliers, saturation), one damaged equally by both is simply sensitive.

A spec's precision plan is set aside for the scan (every selected module is scanned in the spec's own format), and
`propose_plan` turns a layer ranking into one: the most damaging modules, in rank order, kept in higher precision
while they fit a budget stated as a fraction of the selected modules' matmul parameters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quarl.diagnose.metrics import Batch, kl_and_top1, logits_of, token_nll
from quarl.inject import InjectionSpec, Phase, attach, select_modules
from quarl.inject.plan import FULL_PRECISION, PlanRule, PrecisionPlan, canonical, parameter_share
from quarl.inject.select import block_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityRow:
    """Damage caused by injecting one unit alone."""

    unit: str  # module name, or 'block <i>'
    kl: float  # mean KL(clean ‖ injected), nats
    top1: float  # top-1 agreement with the clean model
    nll: float | None  # per-token NLL on reference answers (None without references)
    noise_scale: float | None  # relative_gaussian sigma in noise mode, else None


def _units(model: nn.Module, spec: InjectionSpec, by: str) -> list[tuple[str, InjectionSpec, list[str]]]:
    """(label, narrowed spec, member module names) per unit."""
    names = [n for n, _ in select_modules(model, spec)]
    if by == "layer":
        return [(n, spec.replace(targets=(f"^{re.escape(n)}$",), target_layers=()), [n]) for n in names]
    if by != "block":
        raise ValueError(f"sensitivity unit must be 'layer' or 'block', got {by!r}")
    blocks: dict[int, list[str]] = {}
    for n in names:
        i = block_index(n)
        if i is not None:
            blocks.setdefault(i, []).append(n)
    if not blocks:
        raise ValueError("no decoder-block indices found in the selected module names; use by='layer'")
    return [(f"block {i}", spec.replace(target_layers=(i,)), blocks[i]) for i in sorted(blocks)]


def _noise_spec(spec: InjectionSpec, scale: float) -> InjectionSpec:
    return spec.replace(error_type="relative_gaussian", error_scale=scale, format_options={})


def sensitivity_scan(model: nn.Module, spec: InjectionSpec, batch: Batch, ref_logits: torch.Tensor, *,
                     phase: Phase | str = Phase.ROLLOUT, by: str = "layer", noise: bool = False,
                     noise_scale: float | None = None,
                     measured_rel_err: Callable[[list[str]], float | None] | None = None) -> list[SensitivityRow]:
    """Rank units by the damage of injecting them alone (highest KL first).

    Args:
        model: the clean model (nothing attached).
        spec: the full injection; each unit uses it narrowed to that unit.
        batch: the diagnosis batch; ref_logits: the clean logits on it, (B, T, V).
        phase: the phase to run in (one where ``spec.apply_during`` is active).
        by: 'layer' (each selected module) or 'block' (each decoder block).
        noise: use ``relative_gaussian`` noise instead of the spec's error.
        noise_scale: sigma for noise mode; None = each unit's measured relative error (``measured_rel_err``).
        measured_rel_err: maps a unit's module names to their measured relative error (noise mode, scale None).
    """
    if spec.plan is not None:
        logger.warning("quarl.diagnose: the sensitivity scan sets the precision plan aside: every selected module is "
                       "scanned in %s", spec.error_type)
        spec = spec.replace(plan=None)
    rows = []
    for label, unit_spec, members in _units(model, spec, by):
        scale = None
        if noise:
            scale = noise_scale if noise_scale is not None else (measured_rel_err(members) if measured_rel_err else None)
            if not scale:
                raise ValueError(f"noise mode needs a noise_scale (no measured error for {label})")
            unit_spec = _noise_spec(unit_spec, scale)
        with attach(model, unit_spec, phase=phase), torch.no_grad():
            logits = logits_of(model, batch)
        kl, top1 = kl_and_top1(ref_logits, logits, batch.attention_mask)
        nll = token_nll(logits, batch.input_ids, batch.answer_mask) if batch.answer_mask is not None else None
        rows.append(SensitivityRow(label, kl, top1, nll, scale))
    return sorted(rows, key=lambda r: r.kl, reverse=True)


def propose_plan(model: nn.Module, spec: InjectionSpec, rows: list[SensitivityRow], budget: float,
                 fmt: str = FULL_PRECISION) -> tuple[PrecisionPlan, list[str], float]:
    """The precision plan that keeps the most damaging modules in ``fmt`` under a parameter budget.

    Modules are taken in rank order (highest KL first); each one whose matmul parameters still fit the budget joins
    (a larger one that does not fit is skipped, and smaller ones below it may still join).

    Args:
        model: the clean model; spec: the scanned spec (its plan, if any, is kept and the proposal appended to it).
        rows: a ``by='layer'`` sensitivity ranking of ``spec``.
        budget: the share of the selected modules' matmul parameters allowed in higher precision, in (0, 1].
        fmt: 'none' (full precision) or a quarl.formats name for the kept modules.

    Returns:
        (the plan, the chosen module names in rank order, their parameter share).

    Raises:
        ValueError: a budget outside (0, 1], a block-level ranking, or a budget too small for any ranked module.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"the plan budget is a fraction of the linear parameters in (0, 1], got {budget}")
    selected = select_modules(model, spec.replace(plan=None))
    names = {n for n, _ in selected}
    if any(r.unit not in names for r in rows):
        raise ValueError("propose_plan needs a per-module ranking (sensitivity by='layer')")
    chosen: list[str] = []
    for row in rows:
        if parameter_share(selected, set(chosen) | {row.unit}) <= budget:
            chosen.append(row.unit)
    if not chosen:
        smallest = min(parameter_share(selected, {r.unit}) for r in rows)
        raise ValueError(f"a budget of {budget:.2%} of the linear parameters fits no module (the smallest holds "
                         f"{smallest:.2%})")
    rule = PlanRule(modules=tuple(f"^{re.escape(canonical(n))}$" for n in chosen), format=fmt)
    old = spec.plan
    plan = PrecisionPlan(preset=old.preset if old else None, rules=(old.rules if old else ()) + (rule,))
    return plan, chosen, parameter_share(selected, set(chosen))
