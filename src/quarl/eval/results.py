"""Evaluation records and result files: per-sample JSONL and a summary JSON.

Why: in hand-rolled setups evaluations claimed quantization they did not run, and logs were overwritten or lost. A quarl
evaluation therefore leaves behind, in its output directory,

- ``samples.jsonl``: one row per completion (problem id, prompt, completion, extracted answers under each scorer,
  correctness under each scorer, the reward, token count, whether it stopped on EOS);
- ``summary.json``: the resolved config, the metrics (verl's names AND quarl's per-scorer accuracies, every one with
  a 95% CI), the quantization actually applied as reported by the injector's telemetry (not the config), library
  versions, the git SHA (and whether the tree was dirty), and the device.

Grading lives in :mod:`quarl.eval.gsm8k` and the statistics in :mod:`quarl.eval.metrics`; this module only
assembles :class:`Sample` records into those two files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quarl.data.records import Problem
from quarl.eval import metrics as M
from quarl.eval.gsm8k import Scorer, extract_answer, is_correct, score

SCORERS = (Scorer.STRICT, Scorer.FLEXIBLE, Scorer.NUMERIC)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One scored completion (one row of ``samples.jsonl``)."""

    id: str  # Problem.id
    data_source: str
    sample_index: int  # 0..k-1 within its problem
    prompt: str  # the exact text the model was conditioned on
    completion: str
    ground_truth: str
    extracted: str | None  # verl strict extraction (None: no '#### N' -> counts against format compliance)
    extracted_flexible: str | None
    correct: bool  # under the run's scorer
    correct_strict: bool
    correct_flexible: bool
    correct_numeric: bool
    reward: float  # verl compute_score (strict) with the run's format_score
    n_tokens: int  # generated tokens, EOS included
    finished: bool  # stopped on EOS (False: hit max_new_tokens)


def score_sample(problem: Problem, sample_index: int, prompt: str, completion: str, n_tokens: int, finished: bool,
                 scorer: Scorer = Scorer.STRICT, format_score: float = 0.0) -> Sample:
    """Grade one completion under every scorer (the grading is :mod:`quarl.eval.gsm8k`, nothing else)."""
    gt = problem.ground_truth
    correct = {s: is_correct(completion, gt, s) for s in SCORERS}
    return Sample(problem.id, problem.data_source, sample_index, prompt, completion, gt,
                  extract_answer(completion, "strict"), extract_answer(completion, "flexible"), correct[scorer],
                  correct[Scorer.STRICT], correct[Scorer.FLEXIBLE], correct[Scorer.NUMERIC],
                  score(completion, gt, Scorer.STRICT, format_score=format_score), n_tokens, finished)


def _grid(samples: Sequence[Sample], field: str) -> tuple[np.ndarray, list[list[Any]]]:
    """Per-problem rows of ``field`` in first-seen problem order: (P, k) float array and the raw (P, k) values."""
    rows: dict[str, list[Any]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.sample_index):
        rows[s.id].append(getattr(s, field))
    raw = [rows[i] for i in dict.fromkeys(s.id for s in samples)]
    if len({len(r) for r in raw}) > 1:
        raise ValueError("every problem needs the same number of samples")
    numeric = np.array([[float(v) if isinstance(v, (bool, int, float)) else 0.0 for v in r] for r in raw])
    return numeric, raw


def source_metrics(samples: Sequence[Sample], seed: int = 0) -> dict[str, Any]:
    """quarl's accuracy block for one data source: every scorer side by side plus format compliance, with CIs."""
    _, preds = _grid(samples, "extracted")
    _, preds_flex = _grid(samples, "extracted_flexible")
    out: dict[str, Any] = {"n_problems": len(preds), "samples_per_problem": len(preds[0]) if preds else 0}
    for s, votes in ((Scorer.STRICT, preds), (Scorer.FLEXIBLE, preds_flex), (Scorer.NUMERIC, preds)):
        out[s.value] = M.accuracy_metrics(_grid(samples, f"correct_{s.value}")[0], votes, seed=seed)
    extracted = np.array([[p is not None for p in row] for row in preds], dtype=np.float64)
    out["format_rate"] = M.rate_metric(extracted, seed=seed)  # fraction with a strict '#### N' answer
    out["truncated_rate"] = M.rate_metric(1.0 - _grid(samples, "finished")[0], seed=seed)
    return out


def _verl_per_prompt(samples: Sequence[Sample], seed: int = 42) -> dict:
    """verl's per-prompt values; ``acc`` = verl strict correctness, ``reward`` = compute_score, ``pred`` votes."""
    infos = {"reward": [s.reward for s in samples], "acc": [float(s.correct_strict) for s in samples],
             "pred": [s.extracted or "" for s in samples]}
    return M.verl_per_prompt_metrics([s.data_source for s in samples], [s.id for s in samples], infos, seed=seed)


def _average(per_prompt: dict) -> dict[str, float]:
    """verl's validation metrics (the mean over prompts), flattened to verl's names."""
    return M.verl_metric_names({src: {var: {m: float(np.mean(v)) for m, v in metrics.items()}
                                      for var, metrics in var2m.items()} for src, var2m in per_prompt.items()})


def verl_metrics(samples: Sequence[Sample], seed: int = 42) -> dict[str, float]:
    """verl-named validation metrics; ``acc`` = verl strict correctness, ``reward`` = compute_score, ``pred`` votes."""
    return _average(_verl_per_prompt(samples, seed))


def summarize(samples: Sequence[Sample], seed: int = 0) -> dict[str, Any]:
    """All metrics: ``{"verl": {...}, "verl_ci": {val-core name: CI}, "by_source": {data_source: source_metrics}}``."""
    by_source: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_source[s.data_source].append(s)
    per_prompt = _verl_per_prompt(samples)
    return {"verl": _average(per_prompt), "verl_ci": M.verl_core_intervals(per_prompt, seed),
            "by_source": {k: source_metrics(v, seed) for k, v in by_source.items()}}


def format_ci(m: dict[str, Any]) -> str:
    """``"41.2% [37.0, 45.6] (wilson 95%, n=500)"`` for a metric dict from :mod:`quarl.eval.metrics`."""
    return f"{100 * m['value']:.1f}% [{100 * m['ci_low']:.1f}, {100 * m['ci_high']:.1f}] ({m['ci']}, n={m['n']})"


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Human-readable lines: every accuracy with its CI, strict and flexible side by side, format compliance."""
    lines = []
    for src, block in metrics["by_source"].items():
        lines.append(f"{src}: {block['n_problems']} problems x {block['samples_per_problem']} samples")
        for name in block[Scorer.STRICT.value]:
            for s in SCORERS:
                tag = " (verl default)" if s is Scorer.STRICT else (" (not verl)" if s is Scorer.NUMERIC else "")
                lines.append(f"  {name:<8} {s.value:<9} {format_ci(block[s.value][name])}{tag}")
        lines.append(f"  format compliance (has '#### N')  {format_ci(block['format_rate'])}")
        lines.append(f"  truncated (no EOS)                {format_ci(block['truncated_rate'])}")
    return lines


def verl_lines(metrics: dict[str, Any]) -> list[str]:
    """``val-core/openai/gsm8k/acc/mean@1 = 0.4120 [0.3700, 0.4560] (wilson 95%, n=500)``: verl's core metrics on
    verl's 0-1 scale, each with its 95% CI (the ``val-aux`` metrics stay in ``summary.json`` only)."""
    lines = []
    for name, m in metrics["verl_ci"].items():
        lines.append(f"{name} = {metrics['verl'][name]:.4f} [{m['ci_low']:.4f}, {m['ci_high']:.4f}] "
                     f"({m['ci']}, n={m['n']})")
    return lines


def environment() -> dict[str, Any]:
    """Versions, git SHA (+ dirty flag), host and device, for the run header (what reproducing the run needs)."""
    import tokenizers
    import torch
    import transformers

    import quarl

    env = {"quarl": quarl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__, "python": platform.python_version(), "host": platform.node(),
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    env.update(_git_state(Path(__file__).resolve().parent))
    return env


def _git_state(where: Path) -> dict[str, Any]:
    """``{"git_sha": ..., "git_dirty": ...}`` when ``where`` is inside a git checkout, else ``{"git_sha": None}``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None}
    if sha.returncode != 0:
        return {"git_sha": None}
    return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def write_samples_jsonl(samples: Sequence[Sample], path: str | Path) -> None:
    """One JSON object per completion (all :class:`Sample` fields)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(dataclasses.asdict(s), ensure_ascii=False) + "\n")


def read_samples_jsonl(path: str | Path) -> list[Sample]:
    """Read back what :func:`write_samples_jsonl` wrote."""
    with open(path, encoding="utf-8") as f:
        return [Sample(**json.loads(line)) for line in f if line.strip()]


def write_summary_json(summary: dict[str, Any], path: str | Path) -> None:
    """Write the summary (config, metrics, quantization, environment) as indented JSON."""
    Path(path).write_text(json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_run(out_dir: str | Path, samples: Sequence[Sample], metrics: dict[str, Any],
              quantization: dict[str, Any] | None, config: dict[str, Any]) -> dict[str, Any]:
    """Write ``samples.jsonl`` and ``summary.json`` into ``out_dir`` (never over an earlier run's files).

    Args:
        out_dir: the run directory (created; must not already hold a ``summary.json`` or ``samples.jsonl``).
        samples: scored completions.
        metrics: :func:`summarize` output.
        quantization: the injector telemetry recorded by the harness (None: evaluated without injection).
        config: the resolved run configuration (model, data, eval config, spec).

    Returns:
        The summary dict that was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "samples.jsonl"):
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists; results are never overwritten (choose another --out)")
    summary = {"config": config, "metrics": metrics, "quantization": quantization, "environment": environment()}
    write_samples_jsonl(samples, out / "samples.jsonl")
    write_summary_json(summary, out / "summary.json")
    return summary
