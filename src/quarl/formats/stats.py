"""Error statistics of an emulated tensor against its original: relative L2 error, SQNR, max abs error.

    rel_err = ||y - x|| / ||x||        sqnr_db = 10 log10(sum x^2 / sum (y - x)^2) = -20 log10(rel_err)

The SQNR convention is torchao's ``compute_error``. Computed in float64 so the statistic itself adds no rounding.
(``quarl.inject.telemetry`` accumulates the same sums in a streaming form across calls.)
"""

from __future__ import annotations

import math

import torch


def error_stats(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(relative L2 error, SQNR in dB, max abs error) of ``y`` against ``x``.

    Args:
        x: the original tensor.
        y: its emulation (same shape).

    Returns:
        ``(rel_err, sqnr_db, max_abs_err)``; an exact ``y`` gives SQNR ``inf``, an all-zero ``x`` gives rel_err 0.

    >>> error_stats(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0]))
    (0.0, inf, 0.0)
    """
    x64, err = x.double(), y.double() - x.double()
    signal, noise = float((x64**2).sum()), float((err**2).sum())
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    rel = math.sqrt(noise / signal) if signal > 0 else 0.0
    return rel, sqnr, float(err.abs().max()) if err.numel() else 0.0
