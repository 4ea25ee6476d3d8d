"""`plot_damage`: a PNG of per-layer damage (matplotlib, Agg backend: no display needed).

With a sensitivity scan the bars are its KL per unit (in model order, so depth trends are visible); without one,
the per-layer relative error of the injected weight and input (the error *size*, not its effect).
"""

from __future__ import annotations

from pathlib import Path

from quarl.diagnose.report import DiagnoseReport


def plot_damage(report: DiagnoseReport, path: str | Path) -> Path:
    """Write the per-layer damage bar chart of ``report`` to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {r.module: i for i, r in enumerate(report.layers)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * max(len(report.layers), len(report.sensitivity))), 4.0))
    if report.sensitivity:
        rows = sorted(report.sensitivity, key=lambda r: (order.get(r.unit, -1), r.unit))
        ax.bar(range(len(rows)), [r.kl for r in rows], color="tab:red")
        ax.set_ylabel("KL(clean || injected) [nats/token]")
        ax.set_title(f"layer sensitivity ({report.sensitivity_mode}): {report.spec['error_type']}")
        labels = [r.unit for r in rows]
    else:
        labels = [r.module for r in report.layers]
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [r.weight.get("rel_err", 0.0) for r in report.layers], 0.4, label="weight")
        x_rel = [(r.input or r.output).get("rel_err", 0.0) for r in report.layers]
        ax.bar([x + 0.2 for x in xs], x_rel, 0.4, label="input/output")
        ax.set_ylabel("relative error ||e(t) - t|| / ||t||")
        ax.set_title(f"injected error per layer: {report.spec['error_type']} ({report.spec['injection_point']})")
        ax.legend()
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([lab.split("model.")[-1] for lab in labels], rotation=90, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
