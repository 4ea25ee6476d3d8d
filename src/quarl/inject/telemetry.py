"""Telemetry of an injection: did each hook fire, in which phase, and how large was the error it injected.

Error statistics are of the tensors that were actually injected (the linear's weight, its input, its output), never
of the residual stream, accumulated over every measured call:

    rel_err  = sqrt(Σ‖e(x) − x‖² / Σ‖x‖²)
    sqnr_db  = 10·log10(Σ‖x‖² / Σ‖e(x) − x‖²)       (= −20·log10 rel_err; torchao ``compute_error`` convention)
    zero_frac = #{e(x) == 0} / numel                  (after injection: flushed blocks, deadzones)
    amax      = max |x|,  outlier = max_t max|x| / rms(x)   (before injection)

Sums live in an fp64 tensor on the tensor's device and are read back only in `TensorStats.summary`, so measuring
does not force a device sync on every forward.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch


def stats_row(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """fp64 [Σx², Σ(q−x)², #zeros(q), numel, max|x|, max|x|/rms(x)] of one (clean, injected) pair."""
    with torch.no_grad():
        # flat fp32 views (no copy for fp32 inputs); dot products and count_nonzero avoid temporaries
        xf = x.detach().reshape(-1).float()
        qf = q.detach().reshape(-1).float()
        diff = qf - xf  # the only full-size temporary
        sig = torch.dot(xf, xf)
        n = max(xf.numel(), 1)
        lo, hi = torch.aminmax(xf) if xf.numel() else (xf.new_zeros(()), xf.new_zeros(()))
        amax = torch.maximum(-lo, hi)
        rms = (sig / n).sqrt()
        return torch.stack([
            sig, torch.dot(diff, diff), (xf.numel() - torch.count_nonzero(qf)).float(),
            xf.new_tensor(float(xf.numel())), amax, torch.where(rms > 0, amax / rms, torch.zeros_like(rms)),
        ]).double()


@dataclass
class TensorStats:
    """Accumulated error statistics of one injected tensor role (weight / input / output) of one module."""

    measured: int = 0  # calls measured
    _acc: torch.Tensor | None = None  # fp64 [Σx², Σerr², #zeros, numel, max|x|, max outlier ratio]

    def update(self, x: torch.Tensor, q: torch.Tensor) -> None:
        """Add one (clean, injected) pair."""
        self.add(stats_row(x, q))

    def add(self, row: torch.Tensor) -> None:
        """Add one precomputed `stats_row` (lets modules that read the same tensor share one measurement)."""
        if self._acc is None:
            self._acc = row.clone()
        else:
            self._acc[:4] += row[:4]
            self._acc[4:] = torch.maximum(self._acc[4:], row[4:])
        self.measured += 1

    def summary(self) -> dict[str, float]:
        """Plain floats: measured, rel_err, sqnr_db, zero_frac, amax, outlier (empty dict if never measured)."""
        if self._acc is None:
            return {}
        sig, err, zeros, numel, amax, outlier = self._acc.tolist()
        rel = math.sqrt(err / sig) if sig > 0 else (0.0 if err == 0 else math.inf)
        sqnr = math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
        return {"measured": self.measured, "rel_err": rel, "sqnr_db": sqnr, "zero_frac": zeros / max(numel, 1),
                "amax": amax, "outlier": outlier}


@dataclass
class ModuleTelemetry:
    """Per injected module: hook fires per phase and error statistics per tensor role."""

    fires: Counter = field(default_factory=Counter)  # phase name ('rollout' | 'training' | 'unset') -> injected calls
    skipped: Counter = field(default_factory=Counter)  # phase name -> calls where apply_during excluded the phase
    weight_computations: int = 0  # how often the weight error was (re)computed: once per weight version
    roles: dict[str, TensorStats] = field(default_factory=dict)  # 'weight' | 'input' | 'output' -> stats

    def measure(self, role: str, x: torch.Tensor, q: torch.Tensor, row: torch.Tensor | None = None) -> None:
        """Record one injected tensor (``row``: its precomputed `stats_row`, if already measured elsewhere)."""
        self.roles.setdefault(role, TensorStats()).add(stats_row(x, q) if row is None else row)

    def summary(self) -> dict:
        """JSON-ready dict."""
        return {
            "fires": dict(self.fires), "skipped": dict(self.skipped),
            "weight_computations": self.weight_computations,
            **{role: stats.summary() for role, stats in self.roles.items()},
        }
