"""Accuracy metrics for GSM8K evaluation: mean@k, maj@k, best@k (= pass@k), verl's metric names, and 95% CIs.

Definitions, for ``P`` problems with ``k`` sampled completions each and per-completion correctness ``c[p, j]``:

- ``mean@k`` = mean over problems of ``mean_j c[p, j]`` (with ``k = 1``: plain accuracy).
- ``best@k`` (= pass@k with ``n = k``) = fraction of problems with at least one correct completion. For ``n >= k``
  samples the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large Language Models
  Trained on Code", eq. 1) is :func:`pass_at_k`.
- ``maj@k`` = fraction of problems whose majority-vote answer is correct. The vote is verl's ``calc_maj_val``: votes
  are the extracted answers (no answer votes as ``""``), the most frequent wins, ties go to the answer seen first.

Confidence intervals (identical RL configs have been seen to spread 53-70% between runs, so a number without one
says little):
a per-problem *binary* quantity (mean@1, best@k, maj@k, the k = 1 format rate) gets the Wilson score interval
(Wilson 1927; Brown, Cai & DasGupta 2001 recommend it over the Wald interval for small n or extreme p); a per-problem
*fraction* (mean@k, k > 1) gets a percentile bootstrap over problems (problems are the independent units; the k
samples of one problem are not).

verl compatibility: :func:`verl_validation_metrics` re-implements ``process_validation_metrics`` of
``volcengine/verl: verl/trainer/ppo/metric_utils.py`` (mean@N, std@N, and the bootstrap estimates best@n/{mean,std},
worst@n/{mean,std}, maj@n/{mean,std} for n = 2, 4, ..., N with 1000 resamples and seed 42, drawn with
``np.random.choice`` from a freshly seeded legacy RNG per call, as verl does), and :func:`verl_metric_names` applies
the naming of ``RayPPOTrainer._validate``: ``val-core/{data_source}/{var}/{metric}`` for the core variable
(``acc`` when present, else ``reward``) and the mean/maj/best metrics at the largest n, ``val-aux/...`` otherwise.
Note that verl's ``best@N/mean`` is a bootstrap average (resampling WITH replacement), not pass@N.
:func:`verl_core_intervals` gives each ``val-core`` metric a 95% CI over prompts (verl itself reports none), so the
CLI can print every verl-named accuracy with its interval.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        successes: number of successes.
        n: number of trials (0 gives the uninformative (0, 1)).
        z: normal quantile (1.96 for 95%).

    Returns:
        (low, high), inside [0, 1].

    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (p = 1) the exact bound is 0 (1); pin it instead of leaving a 1e-17 rounding residue.
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def bootstrap_interval(values: Sequence[float], n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per independent unit).

    Args:
        values: per-problem values (e.g. the fraction of a problem's k samples that are correct).
        n_boot: resamples.
        seed: RNG seed (the interval is deterministic given the seed).
        level: coverage.

    Returns:
        (low, high).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(preds: Sequence[Hashable], vals: Sequence[float]) -> float:
    """verl ``calc_maj_val``: the value of the first sample voting for the most frequent prediction (ties: first seen).

    >>> majority_vote(["7", "8", "8", "7"], [1.0, 0.0, 0.0, 1.0])
    1.0
    """
    first_val: dict[Hashable, float] = {}
    counts: dict[Hashable, int] = defaultdict(int)
    for p, v in zip(preds, vals, strict=True):
        first_val.setdefault(p, v)
        counts[p] += 1
    return first_val[max(counts, key=counts.get)]


def _ci(kind: str, per_problem: np.ndarray, seed: int) -> dict[str, Any]:
    """Value with a 95% CI: Wilson for 0/1 per-problem values, bootstrap over problems otherwise."""
    value = float(per_problem.mean()) if per_problem.size else float("nan")
    if kind == "wilson":
        lo, hi = wilson_interval(int(per_problem.sum()), int(per_problem.size))
    else:
        lo, hi = bootstrap_interval(per_problem, seed=seed)
    return {"value": value, "ci_low": lo, "ci_high": hi, "ci": f"{kind} 95%", "n": int(per_problem.size)}


def accuracy_metrics(correct: np.ndarray, preds: Sequence[Sequence[Hashable]], seed: int = 0) -> dict[str, dict]:
    """mean@k, best@k and maj@k with 95% CIs for one scorer.

    Args:
        correct: (P, k) 0/1 correctness, P problems by k samples.
        preds: (P, k) extracted answers used as votes (None or "" = no answer).
        seed: bootstrap seed.

    Returns:
        ``{"mean@k": {...}, "best@k": {...}, "maj@k": {...}}``, each with value, ci_low, ci_high, ci, n.
    """
    correct = np.asarray(correct, dtype=np.float64).reshape(len(preds), -1)  # (P, k)
    k = correct.shape[1]
    mean = correct.mean(axis=1)  # (P,)
    out = {f"mean@{k}": _ci("wilson" if k == 1 else "bootstrap", mean, seed)}
    if k > 1:
        best = correct.max(axis=1)  # (P,)
        maj = np.array([majority_vote(["" if p is None else p for p in row], c) for row, c in zip(preds, correct)])
        out[f"best@{k}"] = _ci("wilson", best, seed)
        out[f"maj@{k}"] = _ci("wilson", maj, seed)
    return out


def rate_metric(flags: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """A per-completion 0/1 rate (e.g. format compliance) with a 95% CI; flags is (P, k)."""
    flags = np.asarray(flags, dtype=np.float64)
    per_problem = flags.mean(axis=1)  # (P,)
    return _ci("wilson" if flags.shape[1] == 1 else "bootstrap", per_problem, seed)


def _gen_ns(n_resps: int) -> list[int]:
    """verl: n = 2, 4, 8, ... below n_resps, then n_resps itself."""
    ns, n = [], 2
    while n < n_resps:
        ns.append(n)
        n *= 2
    return ns + [n_resps] if n_resps > 1 else []


def _verl_bootstrap_idx(n_data: int, subset_size: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """verl ``bootstrap_metric`` indices: ``np.random.seed(seed); np.random.choice(...)`` (a legacy RandomState)."""
    return np.random.RandomState(seed).choice(n_data, size=(n_bootstrap, subset_size), replace=True)


def _bootstrap_majority(preds: list[Hashable], vals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """:func:`majority_vote` on every resample row of ``idx`` (R, n), vectorized; ties go to the first seen."""
    code_of: dict[Hashable, int] = {}
    codes = np.array([code_of.setdefault(p, len(code_of)) for p in preds])  # (n_resps,) equal preds -> equal codes
    votes = codes[idx]  # (R, n)
    n_codes, (n_rows, n) = int(codes.max()) + 1, idx.shape
    onehot = votes[:, :, None] == np.arange(n_codes)  # (R, n, C)
    counts = onehot.sum(axis=1)  # (R, C)
    first = np.where(onehot.any(axis=1), onehot.argmax(axis=1), n)  # (R, C) first position of each code in the row
    winner = np.argmax(counts * (n + 1) - first, axis=1)  # (R,) most votes, then earliest first appearance
    return vals[idx[np.arange(n_rows), first[np.arange(n_rows), winner]]]  # value of the winner's first sample


def _verl_uid_metrics(vals: list[float], preds: list[Hashable] | None, n_bootstrap: int, seed: int) -> dict:
    """verl's per-prompt metrics for one variable (mean@N, std@N, best/worst/maj@n bootstrap estimates)."""
    n_resps = len(vals)
    metric = {f"mean@{n_resps}": float(np.mean(vals))}
    if n_resps == 1:
        return metric
    metric[f"std@{n_resps}"] = float(np.std(vals))
    v = np.asarray(vals, dtype=np.float64)
    for n in _gen_ns(n_resps):
        idx = _verl_bootstrap_idx(n_resps, n, n_bootstrap, seed)  # (n_bootstrap, n)
        best, worst = v[idx].max(axis=1), v[idx].min(axis=1)  # (n_bootstrap,)
        metric[f"best@{n}/mean"], metric[f"best@{n}/std"] = float(best.mean()), float(best.std())
        metric[f"worst@{n}/mean"], metric[f"worst@{n}/std"] = float(worst.mean()), float(worst.std())
        if preds is not None:
            maj = _bootstrap_majority(preds, v, idx)  # (n_bootstrap,)
            metric[f"maj@{n}/mean"], metric[f"maj@{n}/std"] = float(maj.mean()), float(maj.std())
    return metric


def verl_per_prompt_metrics(data_sources: Sequence[str], uids: Sequence[Hashable], infos: dict[str, Sequence[Any]],
                            seed: int = 42, n_bootstrap: int = 1000) -> dict[str, dict[str, dict[str, list[float]]]]:
    """verl's per-prompt metric values before averaging: ``{data_source: {var: {metric: [one value per prompt]}}}``.

    Args: as :func:`verl_validation_metrics`. The per-prompt values are what :func:`verl_core_intervals` resamples.
    """
    grouped: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # src -> uid -> var -> values
    for i, (src, uid) in enumerate(zip(data_sources, uids, strict=True)):
        for var, values in infos.items():
            grouped[src][uid][var].append(values[i])
    per_src: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # src -> var -> metric -> per-uid
    for src, uid2vars in grouped.items():
        for var2vals in uid2vars.values():
            preds = var2vals.get("pred")
            for var, vals in var2vals.items():
                if not vals or isinstance(vals[0], str):
                    continue
                for name, value in _verl_uid_metrics(vals, preds, n_bootstrap, seed).items():
                    per_src[src][var][name].append(value)
    return {src: {var: dict(metrics) for var, metrics in var2m.items()} for src, var2m in per_src.items()}


def verl_validation_metrics(data_sources: Sequence[str], uids: Sequence[Hashable], infos: dict[str, Sequence[Any]],
                            seed: int = 42, n_bootstrap: int = 1000) -> dict[str, dict[str, dict[str, float]]]:
    """verl ``process_validation_metrics``: ``{data_source: {var: {metric: value averaged over prompts}}}``.

    Args:
        data_sources: data source per completion.
        uids: prompt id per completion (completions of one prompt share it).
        infos: variable name -> value per completion; string-valued variables are skipped, and a ``"pred"``
            variable (strings) enables maj@n, exactly as in verl.
        seed: bootstrap seed (verl: 42).
        n_bootstrap: resamples (verl: 1000).

    Returns:
        The nested metric dict.
    """
    per_prompt = verl_per_prompt_metrics(data_sources, uids, infos, seed, n_bootstrap)
    return {src: {var: {m: float(np.mean(v)) for m, v in metrics.items()} for var, metrics in var2m.items()}
            for src, var2m in per_prompt.items()}


def verl_core_intervals(per_prompt: dict[str, dict[str, dict[str, list[float]]]],
                        seed: int = 0) -> dict[str, dict[str, Any]]:
    """A 95% CI for every ``val-core`` metric, over prompts (the independent units), keyed by verl's flat name.

    Wilson when every per-prompt value is 0 or 1 (e.g. ``acc/mean@1``), else a percentile bootstrap over prompts
    (``mean@k``, verl's bootstrap ``best@k/mean``, ``maj@k/mean``). Each ``value`` equals the verl metric itself.

    Args:
        per_prompt: :func:`verl_per_prompt_metrics` output.
        seed: bootstrap seed.

    Returns:
        ``{"val-core/{data_source}/{var}/{metric}": {"value", "ci_low", "ci_high", "ci", "n"}}``.
    """
    cis = {src: {var: {m: _ci("wilson" if set(v) <= {0.0, 1.0} else "bootstrap", np.asarray(v, np.float64), seed)
                       for m, v in metrics.items()} for var, metrics in var2m.items()}
           for src, var2m in per_prompt.items()}
    return {name: ci for name, ci in verl_metric_names(cis).items() if name.startswith("val-core/")}


def verl_metric_names(nested: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Flatten :func:`verl_validation_metrics` output with verl's ``val-core``/``val-aux`` naming (``_validate``).

    Values are carried over unchanged (floats, or the CI dicts of :func:`verl_core_intervals`).

    >>> verl_metric_names({"openai/gsm8k": {"acc": {"mean@1": 0.5}, "reward": {"mean@1": 0.5}}})
    {'val-core/openai/gsm8k/acc/mean@1': 0.5, 'val-aux/openai/gsm8k/reward/mean@1': 0.5}
    """
    flat = {}
    for src, var2metric in nested.items():
        core_var = "acc" if "acc" in var2metric else "reward"
        for var, metrics in var2metric.items():
            n_max = max(int(name.split("@")[-1].split("/")[0]) for name in metrics)
            for name, value in metrics.items():
                core = var == core_var and name.startswith(("mean", "maj", "best")) and f"@{n_max}" in name
                flat[f"{'val-core' if core else 'val-aux'}/{src}/{var}/{name}"] = value
    return flat


