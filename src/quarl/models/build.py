"""Build and report the embedded testbed: what ``quarl testbed build`` and ``quarl testbed report`` run.

``build_testbed`` pre-trains the model of :mod:`quarl.models.testbed` from :data:`DEFAULT_CONFIG`, saves it as a
Hugging Face directory (safetensors + config + tokenizer + chat template), the resolved config
(``build_config.yaml``), the loss curve (``loss_curve.png``, if matplotlib is installed) and a short report
(``build_report.json`` / ``build_report.md``: parameters, time, threads, final loss, held-out greedy accuracy by number
of reasoning steps).

``quant_report`` is the table the README quotes: greedy strict accuracy (verl's ``#### N`` scorer) with a 95% Wilson
interval and the format-compliance rate on held-out problems, for the unquantized checkpoint and for the weight-only
(W4A16) and weight+activation (W4A4) 4-bit schemes of ``quarl.inject`` in MXFP4 and NVFP4 (linear layers only;
embeddings and the tied output head stay in full precision, as in deployed W4A4 recipes). The checkpoint is fp32,
so the baseline row is fp32, not bf16, and is labelled so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quarl import configio
from quarl.data.records import Problem
from quarl.eval.harness import EvalConfig, GenerationConfig, run_eval
from quarl.eval.metrics import wilson_interval
from quarl.inject import InjectionSpec
from quarl.mdtable import render_table
from quarl.models.testbed import DEFAULT_CONFIG, TestbedConfig, deterministic, held_out, pretrain

log = logging.getLogger(__name__)

# (row label, quarl.inject scheme); None = the checkpoint as shipped.
SCHEME_ROWS: tuple[tuple[str, str | None], ...] = (
    ("unquantized (fp32)", None),
    ("MXFP4 W4A16", "MXFP4A16"),
    ("MXFP4 W4A4", "MXFP4"),
    ("NVFP4 W4A16", "NVFP4A16"),
    ("NVFP4 W4A4", "NVFP4"),
)
MAX_NEW_TOKENS = 160  # the longest reference solution is ~110 tokens
REPORT_CMD = "quarl testbed report --n 500"


@dataclasses.dataclass(frozen=True)
class AccuracyRow:
    """Greedy held-out accuracy of one model variant."""

    label: str
    scheme: str | None
    n: int
    correct: int
    formatted: int  # completions with an extractable '#### N'
    by_steps: dict[int, tuple[int, int]]  # number of steps -> (correct, total)
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    def ci(self) -> tuple[float, float]:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.correct, self.n)


def evaluate(model: Any, tokenizer: Any, problems: list[Problem], label: str = "unquantized (fp32)",
             scheme: str | None = None, batch_size: int = 64, progress: bool = False,
             max_new_tokens: int = MAX_NEW_TOKENS) -> AccuracyRow:
    """Greedy strict accuracy of ``model`` on ``problems`` (optionally under a quarl.inject scheme).

    ``max_new_tokens`` caps each completion (EOS included); a truncated completion has no ``#### N`` and counts wrong.
    """
    cfg = EvalConfig(generation=GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size))
    spec = InjectionSpec(scheme=scheme) if scheme else None
    t0 = time.perf_counter()
    result = run_eval(model, tokenizer, problems, cfg, spec=spec, progress=progress)
    steps_of = {p.id: int(p.meta.get("num_steps", 0)) for p in problems}
    by_steps: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for s in result.samples:
        by_steps[steps_of[s.id]][0] += int(s.correct_strict)
        by_steps[steps_of[s.id]][1] += 1
    return AccuracyRow(label=label, scheme=scheme, n=len(result.samples),
                       correct=sum(s.correct_strict for s in result.samples),
                       formatted=sum(s.extracted is not None for s in result.samples),
                       by_steps={k: tuple(v) for k, v in sorted(by_steps.items())},
                       seconds=time.perf_counter() - t0)


def quant_report(model: Any, tokenizer: Any, n: int = 500, cfg: TestbedConfig = DEFAULT_CONFIG,
                 on_row: Callable[[AccuracyRow], None] | None = None) -> list[AccuracyRow]:
    """Evaluate every row of :data:`SCHEME_ROWS` on ``n`` held-out problems (greedy, deterministic)."""
    problems = held_out(cfg, n)
    rows = []
    with deterministic(cfg.train.threads):
        for label, scheme in SCHEME_ROWS:
            rows.append(evaluate(model, tokenizer, problems, label, scheme))
            log.info("%s: %.1f%%", label, 100 * rows[-1].accuracy)
            if on_row is not None:
                on_row(rows[-1])
    return rows


def markdown_table(rows: list[AccuracyRow]) -> str:
    """The README table: accuracy with 95% Wilson CI, change vs the first row, format compliance, by steps."""
    steps = sorted({k for r in rows for k in r.by_steps})
    head = ["variant", "accuracy [95% CI]", "Δ vs baseline", "format compliance"] + [f"{k}-step" for k in steps]
    base = rows[0].accuracy
    cells = []
    for r in rows:
        lo, hi = r.ci()
        delta = "—" if r is rows[0] else f"{100 * (r.accuracy - base):+.1f}"
        row = [r.label, f"{100 * r.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]", delta,
               f"{100 * r.formatted / r.n:.1f}%"]
        row += [f"{100 * c / t:.1f}%" if t else "—" for c, t in (r.by_steps.get(k, (0, 0)) for k in steps)]
        cells.append(row)
    lines = [render_table(head, cells)]
    n = rows[0].n
    lines.append(f"\nGreedy, verl strict `#### N` scoring, {n} held-out synthetic problems (disjoint from training), "
                 f"batch 64, fp32 CPU. Reproduce: `{REPORT_CMD.replace('500', str(n))}`.")
    return "\n".join(lines)


def build_testbed(out_dir: Path, cfg: TestbedConfig = DEFAULT_CONFIG,
                  on_step: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Pre-train the testbed from ``cfg`` and write the checkpoint, config, loss curve and report to ``out_dir``.

    Returns:
        The report dict written to ``build_report.json``.
    """
    model, tokenizer, losses, seconds = pretrain(cfg, on_step)
    return write_build(model, tokenizer, losses, seconds, cfg, out_dir)


def write_build(model: Any, tokenizer: Any, losses: list[float], seconds: float, cfg: TestbedConfig,
                out_dir: str | Path) -> dict[str, Any]:
    """Write a trained testbed's checkpoint, resolved config, loss curve and build report; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, tokenizer, out_dir)
    configio.dump_yaml(cfg, out_dir / "build_config.yaml", header="quarl testbed build (resolved TestbedConfig)")
    with deterministic(cfg.train.threads):
        row = evaluate(model, tokenizer, held_out(cfg), progress=False)
    report = {
        "parameters": model.num_parameters(), "vocab_size": len(tokenizer), "train_seconds": round(seconds, 1),
        "torch_threads": cfg.train.threads, "steps": cfg.train.steps, "batch_size": cfg.train.batch_size,
        "final_loss_mean_last_20": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_accuracy": row.accuracy, "heldout_ci95": row.ci(), "heldout_n": row.n,
        "heldout_format_rate": row.formatted / row.n,
        "heldout_accuracy_by_steps": {str(k): c / t for k, (c, t) in row.by_steps.items()},
        "torch": torch.__version__, "losses": [round(x, 5) for x in losses],
    }
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "build_report.md").write_text(_build_markdown(report, row))
    _plot_losses(losses, out_dir / "loss_curve.png")
    return report


def save_checkpoint(model: Any, tokenizer: Any, out_dir: str | Path) -> None:
    """Save as a Hugging Face directory; the tokenizer class is pinned so AutoTokenizer loads tokenizer.json as is."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    path = Path(out_dir) / "tokenizer_config.json"
    tok_cfg = json.loads(path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # never a model-specific (byte-level) class
    path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")


def _build_markdown(report: dict[str, Any], row: AccuracyRow) -> str:
    lo, hi = report["heldout_ci95"]
    by = ", ".join(f"{k}-step {100 * v:.1f}%" for k, v in report["heldout_accuracy_by_steps"].items())
    return (f"# quarl testbed build report\n\n"
            f"- parameters: {report['parameters']:,} (vocab {report['vocab_size']})\n"
            f"- training: {report['steps']} steps x {report['batch_size']} problems, {report['train_seconds']} s "
            f"on {report['torch_threads']} torch threads (torch {report['torch']})\n"
            f"- final training loss (mean of last 20 steps): {report['final_loss_mean_last_20']:.4f}\n"
            f"- held-out greedy accuracy: {100 * row.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={row.n}); "
            f"format compliance {100 * report['heldout_format_rate']:.1f}%\n"
            f"- by number of steps: {by}\n")


def _plot_losses(losses: list[float], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: no loss curve (pip install quarl[plot])")
        return
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set(xlabel="step", ylabel="train loss (completion tokens)", yscale="log", title="quarl testbed pre-training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: keeps rebuilt PNGs byte-comparable
    plt.close(fig)


def compare_checkpoints(a: Path, b: Path) -> list[str]:
    """Differences between two testbed directories: tensors (``torch.equal``), tokenizer and config files.

    Returns:
        Human-readable differences; empty when the checkpoints are bit-identical.
    """
    from safetensors.torch import load_file

    diffs = []
    ta, tb = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    if ta.keys() != tb.keys():
        diffs.append(f"tensor names differ: {sorted(ta.keys() ^ tb.keys())}")
    for k in sorted(ta.keys() & tb.keys()):
        if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            err = (ta[k].float() - tb[k].float()).abs().max().item() if ta[k].shape == tb[k].shape else "shape"
            diffs.append(f"tensor {k} differs (max abs diff {err})")
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        if (Path(a) / name).read_bytes() != (Path(b) / name).read_bytes():
            diffs.append(f"{name} differs")
    return diffs
