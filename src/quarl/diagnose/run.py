"""`diagnose(model, spec, ...)`: why would a quantized run fail? One call, a few prompts, a `DiagnoseReport`.

Steps (all on the caller's device, model switched to ``eval()`` for the duration and restored):

1. clean forward on the prompts (built-in GSM8K-style prompts by default) -> reference logits;
2. attach ``spec`` in a phase where it is active (rollout if ``apply_during`` covers it, else training), forward
   -> KL / top-1 vs clean, per-token NLL on reference answers when given, and the injector's per-module telemetry
   (error of the tensors actually injected, fires per phase); a declared injection that never fired is an ERROR;
3. gradient-flow check in the training phase (`quarl.diagnose.gradflow`): missing gradients are an ERROR;
4. optional sensitivity scan, one layer or block at a time, with the format or with equal-size noise.

The model is restored afterwards: every injector is detached, gradients are put back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from quarl.diagnose.gradflow import gradient_flow
from quarl.diagnose.metrics import Batch, build_batch, kl_and_top1, logits_of, token_nll
from quarl.diagnose.prompts import DEFAULT_PROMPTS
from quarl.diagnose.report import DiagnoseReport, LayerRow
from quarl.diagnose.sensitivity import sensitivity_scan
from quarl.inject import ApplyDuring, InjectionSpec, Phase, attach

logger = logging.getLogger(__name__)


def _active_phase(spec: InjectionSpec) -> Phase:
    return Phase.TRAINING if spec.apply_during is ApplyDuring.TRAINING else Phase.ROLLOUT


def _layer_rows(model: nn.Module, stats: dict[str, dict], grad_stats: dict[str, dict]) -> list[LayerRow]:
    rows = []
    for name, st in stats.items():
        fires = dict(st["fires"])
        for phase, n in grad_stats.get(name, {}).get("fires", {}).items():
            fires[phase] = fires.get(phase, 0) + n
        rows.append(LayerRow(name, type(model.get_submodule(name)).__name__, fires,
                             st.get("weight", {}), st.get("input", {}), st.get("output", {}),
                             st.get("input_scale", ""), st.get("format", "")))
    return rows


def _injected_forward(model: nn.Module, spec: InjectionSpec, batch: Batch, phase: Phase,
                      report_errors: list[str], formats: dict[str, str]) -> tuple[torch.Tensor, dict[str, dict]]:
    inj = attach(model, spec, phase=phase)
    try:
        with torch.no_grad():
            logits = logits_of(model, batch)
        missing = inj.never_fired()
        if missing:
            report_errors.append(f"{len(missing)} declared injections never fired in phase {phase.value!r}: "
                                 f"{', '.join(missing[:10])}")
        stats = inj.stats()
        for fqn, mode in inj.input_scales().items():  # the activation-scale mode each hook actually bound
            stats[fqn]["input_scale"] = mode
        formats.update(inj.formats())  # the format each module actually got (a precision plan may vary it)
        return logits, stats
    finally:
        inj.detach()


def diagnose(model: nn.Module, spec: InjectionSpec, *, tokenizer: Any = None, prompts: Sequence[str] | None = None,
             input_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
             references: Sequence[str] | None = None, check_gradients: bool = True,
             sensitivity: str | None = None, sensitivity_noise: bool = False,
             noise_scale: float | None = None, max_length: int = 512) -> DiagnoseReport:
    """Diagnose ``spec`` on ``model`` (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)``; nothing may be attached.
        spec: the injection to diagnose.
        tokenizer: HF-style tokenizer (``encode``); required for prompts / references.
        prompts: texts (default: `quarl.diagnose.prompts.DEFAULT_PROMPTS`); ignored when ``input_ids`` given.
        input_ids: token id sequences to use instead of prompts.
        references: reference answers, one per prompt, scored by per-token NLL.
        check_gradients: run the gradient-flow check.
        sensitivity: None, 'layer' or 'block': run the sensitivity scan at that granularity.
        sensitivity_noise: scan with relative-gaussian noise instead of the spec's error.
        noise_scale: sigma for the noise scan (None: each unit's measured relative error).
        max_length: truncate sequences to this many tokens.
    """
    device = next(model.parameters()).device
    batch = build_batch(tokenizer=tokenizer, prompts=prompts or (DEFAULT_PROMPTS if input_ids is None else None),
                        input_ids=input_ids, references=references, max_length=max_length)
    batch = Batch(*(t.to(device) if t is not None else None for t in (batch.input_ids, batch.attention_mask,
                                                                       batch.answer_mask)))
    was_training = model.training
    model.eval()
    try:
        return _run(model, spec, batch, check_gradients, sensitivity, sensitivity_noise, noise_scale)
    finally:
        model.train(was_training)


def _run(model: nn.Module, spec: InjectionSpec, batch: Batch, check_gradients: bool, sensitivity: str | None,
         sensitivity_noise: bool, noise_scale: float | None) -> DiagnoseReport:
    phase = _active_phase(spec)
    with torch.no_grad():
        ref = logits_of(model, batch)
    errors: list[str] = []
    formats: dict[str, str] = {}
    logits, stats = _injected_forward(model, spec, batch, phase, errors, formats)
    kl, top1 = kl_and_top1(ref, logits, batch.attention_mask)
    report = DiagnoseReport(spec.to_dict(), phase.value, int(batch.input_ids.shape[0]), batch.n_tokens, kl, top1,
                            errors=errors, formats=formats)
    if batch.answer_mask is not None:
        report.nll_clean = token_nll(ref, batch.input_ids, batch.answer_mask)
        report.nll_injected = token_nll(logits, batch.input_ids, batch.answer_mask)
    grad_stats: dict[str, dict] = {}
    if check_gradients:
        _check_gradients(model, spec, batch, report, grad_stats)
    report.layers = _layer_rows(model, stats, grad_stats)
    report.never_fired = [r.module for r in report.layers if not sum(r.fires.values())]
    for row in report.layers:
        for ph, n in row.fires.items():
            report.fires_by_phase[ph] = report.fires_by_phase.get(ph, 0) + n
    if sensitivity:
        _scan(model, spec, batch, ref, phase, report, sensitivity, sensitivity_noise, noise_scale)
    return report


def _check_gradients(model: nn.Module, spec: InjectionSpec, batch: Batch, report: DiagnoseReport,
                     grad_stats: dict[str, dict]) -> None:
    grad_phase = Phase.TRAINING
    if not spec.apply_during.covers(Phase.TRAINING):
        grad_phase = Phase.ROLLOUT
        report.notes.append("apply_during='rollout': the injection is off in training; gradient flow was checked "
                            "with it on (rollout phase), as a worst case")
    with torch.enable_grad():
        issues, checked, stats = gradient_flow(model, spec, batch, grad_phase)
    grad_stats.update(stats)
    report.grad_phase, report.grad_checked, report.grad_issues = grad_phase.value, checked, issues
    if issues:
        report.errors.append(f"gradient flow: {len(issues)} of {checked} inputs/params get no gradient through the "
                             f"injected model (use_ste={spec.use_ste}); first: {issues[0].kind} {issues[0].name}")


def _scan(model: nn.Module, spec: InjectionSpec, batch: Batch, ref: torch.Tensor, phase: Phase,
          report: DiagnoseReport, by: str, noise: bool, noise_scale: float | None) -> None:
    rel = {r.module: [v["rel_err"] for v in (r.weight, r.input, r.output) if v.get("rel_err") is not None]
           for r in report.layers}

    def measured(members: list[str]) -> float | None:
        values = [v for m in members for v in rel.get(m, [])]
        return sum(values) / len(values) if values else None

    report.sensitivity = sensitivity_scan(model, spec, batch, ref, phase=phase, by=by, noise=noise,
                                          noise_scale=noise_scale, measured_rel_err=measured)
    report.sensitivity_mode = f"{by} / {'noise' if noise else 'quantization'}"
