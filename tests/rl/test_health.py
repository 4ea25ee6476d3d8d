"""Mismatch, TIS and rollout-health metrics (pure functions)."""

import math

import torch

from quarl.rl.health import mismatch_stats, repeats_ngram, rollout_health, tis_weights


def test_identical_logps_mean_no_mismatch():
    lp = torch.log(torch.rand(3, 5))
    s = mismatch_stats(lp, lp.clone(), torch.ones(3, 5), cap=2.0)
    assert s == {"mismatch/kl": 0.0, "mismatch/ratio_mean": 1.0, "mismatch/ratio_max": 1.0,
                 "mismatch/frac_above_cap": 0.0}


def test_k3_kl_ratio_and_cap_on_known_values():
    train = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    roll = torch.tensor([[math.log(0.25), math.log(0.9), -5.0]])  # ratios 2, 1, (padding)
    mask = torch.tensor([[1, 1, 0]])
    s = mismatch_stats(train, roll, mask, cap=1.5)
    k3 = ((2 - 1 - math.log(2)) + 0.0) / 2
    assert math.isclose(s["mismatch/kl"], k3, rel_tol=1e-6)
    assert math.isclose(s["mismatch/ratio_mean"], 1.5, rel_tol=1e-6)
    assert math.isclose(s["mismatch/ratio_max"], 2.0, rel_tol=1e-6)
    assert s["mismatch/frac_above_cap"] == 0.5
    w = tis_weights(train, roll, mask, cap=1.5)
    assert torch.allclose(w, torch.tensor([[1.5, 1.0, 0.0]]))


def test_repeat_detection_and_health_rates():
    assert repeats_ngram([7, 8, 9, 10] * 5)
    assert not repeats_ngram(list(range(40)))
    assert not repeats_ngram([1, 2, 3, 4, 1, 2, 3, 4] + list(range(10, 40)))  # one repeat is not degenerate
    h = rollout_health([[1, 2, 3, 4] * 4, list(range(9)), list(range(5))], [True, False, True])
    assert h == {"rollout/degenerate_rate": 2 / 3, "rollout/repeat_rate": 1 / 3, "rollout/no_eos_rate": 1 / 3}
