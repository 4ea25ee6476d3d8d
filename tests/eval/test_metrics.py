"""mean@k / maj@k / best@k, Wilson and bootstrap intervals, and the verl metric re-implementation.

Run: python -m pytest tests/eval/test_metrics.py -q
"""

import itertools
import math
from collections import defaultdict
from functools import partial

import numpy as np
import pytest

from quarl.eval import metrics as M


def test_wilson_hand_values():
    # p = 0.8, n = 10, z = 1.96: center = (0.8 + 0.19207) / 1.38415 = 0.71679,
    # half = 1.96 * sqrt(0.016 + 0.0096040) / 1.38415 = 0.22657  ->  (0.49022, 0.94336)
    lo, hi = M.wilson_interval(8, 10)
    assert lo == pytest.approx(0.49022, abs=1e-4) and hi == pytest.approx(0.94336, abs=1e-4)  # 5-digit hand values
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    lo0, hi0 = M.wilson_interval(0, 50)
    assert lo0 == 0.0 and 0.0 < hi0 < 0.08  # Wilson (unlike Wald) is not degenerate at p = 0
    lo1, hi1 = M.wilson_interval(50, 50)
    assert hi1 == 1.0 and lo1 > 0.92


def test_bootstrap_interval_brackets_mean_and_shrinks():
    rng = np.random.default_rng(1)
    small, large = rng.random(20), rng.random(2000)
    lo_s, hi_s = M.bootstrap_interval(small, seed=0)
    lo_l, hi_l = M.bootstrap_interval(large, seed=0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x the sqrt -> far narrower
    assert M.bootstrap_interval(small, seed=3) == M.bootstrap_interval(small, seed=3)


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 1), (7, 3, 7), (4, 1, 2)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert M.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)  # float division only
    with pytest.raises(ValueError):
        M.pass_at_k(3, 4, 1)


def test_majority_vote_ties_go_to_first_seen():
    assert M.majority_vote(["1", "2"], [0.0, 1.0]) == 0.0
    assert M.majority_vote(["1", "2", "2"], [0.0, 1.0, 1.0]) == 1.0
    assert M.majority_vote(["", "", "7"], [0.0, 0.0, 1.0]) == 0.0  # no-answer votes can win


def test_accuracy_metrics_planted():
    # 4 problems x 3 samples
    correct = np.array([[1, 1, 0],   # majority "5" correct
                        [0, 0, 1],   # best only
                        [0, 0, 0],
                        [1, 1, 1]])
    preds = [["5", "5", "4"], ["3", "3", "9"], [None, None, "1"], ["8", "8", "8"]]
    m = M.accuracy_metrics(correct, preds)
    assert m["mean@3"]["value"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 1) / 4, abs=1e-12)
    assert m["best@3"]["value"] == 0.75
    assert m["maj@3"]["value"] == 0.5
    assert m["best@3"]["ci"] == "wilson 95%" and m["mean@3"]["ci"] == "bootstrap 95%"
    for v in m.values():
        assert v["ci_low"] <= v["value"] <= v["ci_high"] and v["n"] == 4
    one = M.accuracy_metrics(correct[:, :1], [r[:1] for r in preds])
    assert list(one) == ["mean@1"] and one["mean@1"]["value"] == 0.5
    assert (one["mean@1"]["ci_low"], one["mean@1"]["ci_high"]) == M.wilson_interval(2, 4)


# --- verl: a literal transcription of verl's bootstrap_metric / calc_maj_val / process_validation_metrics ---------
def _ref_bootstrap(data, subset_size, reduce_fns, n_bootstrap=1000, seed=42):
    np.random.seed(seed)
    data_np = np.array(data, dtype=object)
    idxs = np.random.choice(len(data_np), size=(n_bootstrap, subset_size), replace=True)
    res = np.empty((len(reduce_fns), n_bootstrap))
    for f, fn in enumerate(reduce_fns):
        for b in range(n_bootstrap):
            res[f, b] = fn(data_np[idxs[b]])
    return [(float(np.mean(res[f])), float(np.std(res[f]))) for f in range(len(reduce_fns))]


def _ref_maj(data, vote_key, val_key):
    vote2vals = defaultdict(list)
    for d in data:
        vote2vals[d[vote_key]].append(d[val_key])
    counts = {k: len(v) for k, v in vote2vals.items()}
    return vote2vals[max(counts, key=counts.get)][0]


def _ref_process(data_sources, uids, infos, seed=42):
    g = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for i, src in enumerate(data_sources):
        for var, vals in infos.items():
            g[src][uids[i]][var].append(vals[i])
    agg = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for src, u2v in g.items():
        for var2vals in u2v.values():
            preds = var2vals.get("pred")
            for var, vals in var2vals.items():
                if not vals or isinstance(vals[0], str):
                    continue
                n = len(vals)
                metric = {f"mean@{n}": float(np.mean(vals))}
                if n > 1:
                    metric[f"std@{n}"] = float(np.std(vals))
                    ns, s = [], 2
                    while s < n:
                        ns.append(s)
                        s *= 2
                    ns.append(n)
                    for s in ns:
                        (bm, bs), (wm, ws) = _ref_bootstrap(vals, s, [np.max, np.min], seed=seed)
                        metric.update({f"best@{s}/mean": bm, f"best@{s}/std": bs,
                                       f"worst@{s}/mean": wm, f"worst@{s}/std": ws})
                        if preds is not None:
                            vote = [{"val": v, "pred": p} for v, p in zip(vals, preds)]
                            [(mm, ms)] = _ref_bootstrap(vote, s, [partial(_ref_maj, vote_key="pred", val_key="val")],
                                                        seed=seed)
                            metric.update({f"maj@{s}/mean": mm, f"maj@{s}/std": ms})
                for name, value in metric.items():
                    agg[src][var][name].append(value)
    return {src: {var: {m: float(np.mean(v)) for m, v in d.items()} for var, d in v2.items()}
            for src, v2 in agg.items()}


def test_verl_validation_metrics_match_verl_transcription():
    rng = np.random.default_rng(0)
    n_prompts, k = 6, 5
    uids = [f"u{i}" for i in range(n_prompts) for _ in range(k)]
    srcs = ["openai/gsm8k" if i < 4 else "other" for i in range(n_prompts) for _ in range(k)]
    preds = [str(x) for x in rng.integers(0, 3, size=n_prompts * k)]
    acc = [float(p == "1") for p in preds]
    infos = {"acc": acc, "reward": [a * 0.9 for a in acc], "pred": preds}
    ours = M.verl_validation_metrics(srcs, uids, infos)
    ref = _ref_process(srcs, uids, infos)
    assert ours.keys() == ref.keys()
    for src in ref:
        assert ours[src].keys() == ref[src].keys() == {"acc", "reward"}
        for var in ref[src]:
            assert ours[src][var].keys() == ref[src][var].keys()
            for name, value in ref[src][var].items():
                assert ours[src][var][name] == pytest.approx(value, abs=1e-12), (src, var, name)  # float sum order


def test_verl_metric_names():
    nested = {"openai/gsm8k": {"acc": {"mean@4": 0.5, "std@4": 0.1, "best@2/mean": 0.6, "best@4/mean": 0.7,
                                       "maj@4/mean": 0.55, "worst@4/mean": 0.2},
                               "reward": {"mean@4": 0.5}}}
    flat = M.verl_metric_names(nested)
    assert flat["val-core/openai/gsm8k/acc/mean@4"] == 0.5
    assert flat["val-core/openai/gsm8k/acc/best@4/mean"] == 0.7
    assert flat["val-core/openai/gsm8k/acc/maj@4/mean"] == 0.55
    assert "val-aux/openai/gsm8k/acc/best@2/mean" in flat  # not the largest n
    assert "val-aux/openai/gsm8k/acc/std@4" in flat and "val-aux/openai/gsm8k/acc/worst@4/mean" in flat
    assert "val-aux/openai/gsm8k/reward/mean@4" in flat  # acc is the core variable when present
    only_reward = M.verl_metric_names({"s": {"reward": {"mean@1": 1.0}}})
    assert only_reward == {"val-core/s/reward/mean@1": 1.0}
    assert math.isclose(sum(flat.values()), 0.5 + 0.1 + 0.6 + 0.7 + 0.55 + 0.2 + 0.5)
