"""Calibrate static activation scales for on-the-fly injection, the way `quarl quantize` calibrates a checkpoint.

    spec = InjectionSpec(scheme="NVFP4", input_scale="static", ...)       # or any nvfp4 / fp8 input spec
    spec = calibrate_spec(model, spec, batches)                           # input_amax filled, one per module
    inj = attach(model, spec)          # e(x) uses 2688 / amax as its global scale (FP8: amax / 448), fixed

The amax of each selected module's input is recorded over every batch (`export.calibrate_input_amax`, llm-compressor's
``static_minmax`` observer: the running max of ``|x|``), with the injection detached and gradients off, so the
calibrated scales are those of the full-precision model -- the same numbers `export_checkpoint` turns into a
checkpoint's ``input_global_scale`` / ``input_scale``. With the same batches and ``fuse_global_scales=False`` a
checkpoint loaded with static inputs and ``attach(model, calibrate_spec(...))`` compute the same logits bit for bit
(tests/checkpoint/test_calibrate.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from quarl.inject import InjectionSpec
from quarl.inject.input_scale import canonical
from quarl.inject.select import select_modules

from .export import calibrate_input_amax

logger = logging.getLogger(__name__)


def calibrate_spec(model: nn.Module, spec: InjectionSpec, batches: Iterable[dict[str, torch.Tensor]]) -> InjectionSpec:
    """``spec`` with ``input_scale="static"`` and ``input_amax`` calibrated on ``batches``.

    Args:
        model: the model the spec will be attached to (no injection attached while calibrating).
        spec: an injection whose input format has a per-tensor scale (nvfp4, fp8_*) and that injects the input;
            its ``input_scale`` may be anything (it is replaced).
        batches: model kwargs (``input_ids``, ``attention_mask``), each run as ``model(**batch)`` without gradient.

    Returns:
        A new InjectionSpec (the scheme expanded into explicit fields).

    Raises:
        ValueError: the spec cannot take a static scale, selects no module, or a selected module never saw an input.
    """
    probe = spec.replace(input_scale="static", input_amax={"": 1.0})  # validates the static mode before any forward
    selected = select_modules(model, probe)
    was_training = model.training
    model.eval()
    try:
        amax = calibrate_input_amax(model, selected, batches)
    finally:
        model.train(was_training)
    values = {canonical(fqn): float(a.reshape(())) for fqn, a in amax.items()}  # PEFT-wrapped or not: same names
    logger.info("calibrated %d input amaxes (min %.4g, max %.4g)", len(values), min(values.values()),
                max(values.values()))
    return spec.replace(input_scale="static", input_amax=values)
