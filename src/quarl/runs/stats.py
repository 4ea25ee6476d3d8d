"""Confidence intervals for comparing runs: over seeds (Student t) and, within one run, paired over problems.

Why: on small testbeds, identical configs can spread 53-70% between seeds, so a single seed says little. The unit of
replication for "does this config recover accuracy" is the *seed*: each seed gives one value (e.g. final - step-0
accuracy, in points) and the 95% interval of their mean is the Student t interval

    mean ± t_{0.975, n-1} · s / sqrt(n)      (s: sample standard deviation, n seeds)

With one seed there is no between-seed spread to measure, so the only honest interval is the within-run one: the
*paired* difference over the same validation problems (``d_p = correct_final(p) - correct_step0(p)``, bootstrapped
over problems with :func:`quarl.eval.metrics.bootstrap_interval`), or for a single accuracy the Wilson interval
(:func:`quarl.eval.metrics.wilson_interval`). Those intervals only capture evaluation noise, not training noise; the
result says which kind it is (``ci`` field) so tables can show it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from quarl.eval.metrics import Z_95, bootstrap_interval, wilson_interval

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (standard tables, e.g. NIST/SEMATECH e-Handbook
# 1.3.6.7.2); beyond 30 the Cornish-Fisher expansion in :func:`t_quantile_95` is accurate to < 1e-3.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_95(df: int) -> float:
    """t_{0.975, df}: the 95% two-sided Student t quantile.

    >>> t_quantile_95(2), round(t_quantile_95(1000), 3)
    (4.303, 1.962)
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z_95  # Cornish-Fisher: t = z + g1/df + g2/df^2 + g3/df^3 (Abramowitz & Stegun 26.7.5)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with a 95% interval; values in whatever unit the caller used (quarl's tables use points, 0-100)."""

    mean: float
    lo: float
    hi: float
    n: int  # seeds (or 1 for a single run)
    ci: str  # "t over seeds" | "paired bootstrap over problems" | "wilson over problems" | "none"

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def fmt(self, digits: int = 1) -> str:
        """``56.4 ± 4.3`` (symmetric) or ``56.4 [52.0, 60.7]``; ``—`` when nothing was measured."""
        if math.isnan(self.mean):
            return "—"
        if self.ci == "none":
            return f"{self.mean:.{digits}f}"
        if self.ci == "t over seeds":
            return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


MISSING = Estimate(float("nan"), float("nan"), float("nan"), 0, "none")


def seed_interval(values: Sequence[float]) -> Estimate:
    """Mean and Student t 95% interval over per-seed values (n = 1: no interval, ``ci == "none"``).

    >>> e = seed_interval([1.0, 2.0, 3.0])
    >>> e.mean, round(e.lo, 3), round(e.hi, 3), e.n
    (2.0, -0.484, 4.484, 3)
    """
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return MISSING
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, mean, mean, 1, "none")
    half = t_quantile_95(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), "t over seeds")


def paired_difference(before: Mapping[str, bool], after: Mapping[str, bool], scale: float = 100.0,
                      seed: int = 0) -> Estimate:
    """Paired difference ``after - before`` of per-problem correctness over the problems both evaluated.

    Args:
        before, after: problem id -> correct (one validation each, e.g. step 0 and the final step).
        scale: 100 gives points.
        seed: bootstrap seed.

    Returns:
        The mean difference with a percentile-bootstrap 95% interval over problems (``n`` = 1 run).

    Raises:
        ValueError: the two evaluations share no problem.
    """
    ids = sorted(set(before) & set(after))
    if not ids:
        raise ValueError("the two evaluations share no problem id; a paired difference needs the same problems")
    d = np.array([float(after[i]) - float(before[i]) for i in ids]) * scale  # (P,)
    lo, hi = bootstrap_interval(d, seed=seed)
    return Estimate(float(d.mean()), lo, hi, 1, "paired bootstrap over problems")


def accuracy_interval(n_correct: int, n: int, scale: float = 100.0) -> Estimate:
    """One run's accuracy with its Wilson 95% interval over problems."""
    lo, hi = wilson_interval(n_correct, n)
    return Estimate(scale * n_correct / n if n else float("nan"), scale * lo, scale * hi, 1, "wilson over problems")
