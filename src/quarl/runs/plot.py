"""Curves of runs and suites: validation accuracy, reward, AQN sigma and rollout/training mismatch KL vs step.

One colour per experiment (a group of seeds); the line is the mean over seeds at each step and the band its 95%
Student t interval over seeds (one seed: the validation panel shows the run's own Wilson band from
``val/acc_strict_lo`` / ``_hi`` when logged, the other panels no band). A panel whose metric no run logged says so
instead of drawing empty axes. matplotlib is imported lazily (the ``plot`` extra) and uses the Agg backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from quarl.runs.results import Group, metric_series
from quarl.runs.stats import seed_interval

PANELS = (  # (metric key, y label, title, scale)
    ("val/acc_strict", "accuracy (%)", "validation accuracy (strict)", 100.0),
    ("reward/mean", "mean reward", "training reward", 1.0),
    ("aqn/sigma", "σ", "AQN noise σ", 1.0),
    ("mismatch/kl", "KL (k3)", "rollout / training mismatch", 1.0),
)


def _mean_band(group: Group, key: str, scale: float):
    """(steps, mean, lo, hi) over the group's seeds; lo/hi are NaN where fewer than 2 seeds have the step."""
    per_seed = [dict(zip(*metric_series(r.rows, key))) for r in group.runs]
    steps = sorted({s for d in per_seed for s in d})
    mean, lo, hi = [], [], []
    for s in steps:
        est = seed_interval([scale * d[s] for d in per_seed if s in d])
        mean.append(est.mean)
        lo.append(est.lo if est.n >= 2 else math.nan)
        hi.append(est.hi if est.n >= 2 else math.nan)
    if len(group.runs) == 1 and key == "val/acc_strict":  # one seed: its own interval over problems
        rows = {r["step"]: r for r in group.runs[0].rows}
        lo = [scale * rows[s].get("val/acc_strict_lo", math.nan) for s in steps]
        hi = [scale * rows[s].get("val/acc_strict_hi", math.nan) for s in steps]
    return np.array(steps), np.array(mean), np.array(lo, dtype=float), np.array(hi, dtype=float)


def _label(group: Group) -> str:
    n = len(group.runs)
    return f"{group.key} (n={n})" if n > 1 else group.key


def plot_groups(groups: Sequence[Group], path: Path, title: str | None = None,
                references: dict[str, float] | None = None) -> Path:
    """Write a 2 x 2 PNG of the :data:`PANELS` for ``groups``; returns ``path``.

    ``references`` (label -> accuracy in points) are drawn as dashed horizontal lines on the validation panel, e.g.
    the unquantized model's accuracy that a quantized run tries to recover.

    Raises:
        ValueError: no group has any run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in groups if g.runs]
    if not groups:
        raise ValueError("nothing to plot: no runs")
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    for ax, (key, ylabel, panel_title, scale) in zip(axes.flat, PANELS):
        drawn = False
        for i, g in enumerate(groups):
            steps, mean, lo, hi = _mean_band(g, key, scale)
            if steps.size == 0:
                continue
            drawn = True
            color = colors(i % colors.N)
            ax.plot(steps, mean, color=color, marker="o" if steps.size <= 12 else None, markersize=3.5,
                    linewidth=1.6, label=_label(g))
            ok = ~np.isnan(lo) & ~np.isnan(hi)
            if ok.any():
                ax.fill_between(steps[ok], lo[ok], hi[ok], color=color, alpha=0.18, linewidth=0)
        if key == "val/acc_strict":
            for j, (label, value) in enumerate((references or {}).items()):
                ax.axhline(value, color=("0.25", "0.55", "0.75")[j % 3], linestyle="--", linewidth=1.2, label=label)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"{key}: not logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
        elif key == "aqn/sigma":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    by_label = {}  # every experiment once, whichever panel drew it
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(lbl, h)
    labels, handles = list(by_label), list(by_label.values())
    if title:
        fig.suptitle(title, fontsize=13)
    ncol = min(len(labels), 4) or 1
    rows = math.ceil(len(labels) / ncol)
    legend_h = 0.045 * rows + 0.03  # figure fraction reserved for the legend under the panels
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False,
               title=("mean over seeds; band: 95% CI over seeds" if any(len(g.runs) > 1 for g in groups)
                      else "one seed; band: 95% Wilson CI over validation problems"), title_fontsize=9)
    fig.tight_layout(rect=(0, legend_h, 1, 0.95 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
