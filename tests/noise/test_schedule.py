"""AQN schedules: exact values (QeRL's ``trl_trainer/noise_scheduler.py``) and the setup-time never-fires guard."""

import math

import pytest

from quarl.noise import check_schedule, sigma_at

QERL = dict(schedule="qerl", sigma_start=1e-2, sigma_end=1e-4, num_stages=10)


def test_qerl_matches_the_600_step_example():
    # 600 steps, K=10: sigma 0 for steps 0-59, 1e-2 from 60, 5.62e-3 from 120, ... 1e-4 from 540.
    assert [sigma_at(s, 600, **QERL) for s in (0, 1, 59)] == [0.0, 0.0, 0.0]
    assert sigma_at(60, 600, **QERL) == pytest.approx(1e-2, rel=0, abs=0)
    assert sigma_at(119, 600, **QERL) == 1e-2
    assert sigma_at(120, 600, **QERL) == pytest.approx(1e-2 * (1e-2) ** (1 / 8), rel=1e-15)
    assert round(sigma_at(120, 600, **QERL), 5) == 0.00562
    assert sigma_at(540, 600, **QERL) == pytest.approx(1e-4, rel=1e-14)
    assert sigma_at(599, 600, **QERL) == sigma_at(540, 600, **QERL)
    assert sigma_at(10_000, 600, **QERL) == sigma_at(599, 600, **QERL)  # past the end: last stage


def test_qerl_trend_is_the_reference_formula():
    # trend = s0 * (s1/s0) ** (arange(K-1) / (K-2)); stage k >= 1 uses trend[k-1]
    k, total = 7, 70
    trend = [1e-2 * (1e-4 / 1e-2) ** (i / (k - 2)) for i in range(k - 1)]
    for step in range(total):
        stage = min(step * k // total, k - 1)
        expected = 0.0 if stage == 0 else trend[stage - 1]
        got = sigma_at(step, total, schedule="qerl", sigma_start=1e-2, sigma_end=1e-4, num_stages=k)
        assert got == pytest.approx(expected, rel=1e-15, abs=0)


def test_other_schedules_endpoints():
    assert sigma_at(7, 10, schedule="constant", sigma_start=0.3) == 0.3
    assert sigma_at(0, 11, schedule="linear", sigma_start=1.0, sigma_end=0.0) == 1.0
    assert sigma_at(5, 11, schedule="linear", sigma_start=1.0, sigma_end=0.0) == pytest.approx(0.5)
    assert sigma_at(10, 11, schedule="linear", sigma_start=1.0, sigma_end=0.0) == 0.0
    assert sigma_at(0, 11, schedule="cosine", sigma_start=1.0, sigma_end=0.2) == pytest.approx(1.0)
    assert sigma_at(5, 11, schedule="cosine", sigma_start=1.0, sigma_end=0.2) == pytest.approx(0.6)
    assert sigma_at(10, 11, schedule="cosine", sigma_start=1.0, sigma_end=0.2) == pytest.approx(0.2)
    assert math.isclose(sigma_at(2, 4, schedule="cosine", sigma_start=1.0, sigma_end=0.0),
                        (1 + math.cos(math.pi * 2 / 3)) / 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(step=-1, total_steps=10), "step"),
    (dict(step=1.5, total_steps=10), "step"),
    (dict(step=0, total_steps=0), "total_steps"),
    (dict(step=0, total_steps=10, schedule="cosin"), "did you mean"),
    (dict(step=0, total_steps=10, schedule="linear", sigma_end=None), "sigma_end"),
    (dict(step=0, total_steps=10, num_stages=1), "num_stages"),
    (dict(step=0, total_steps=10, sigma_end=0.0), "geometric"),
])
def test_bad_arguments_raise(kwargs, match):
    base = dict(schedule="qerl", sigma_start=1e-2, sigma_end=1e-4)
    base.update(kwargs)
    step, total = base.pop("step"), base.pop("total_steps")
    with pytest.raises(ValueError, match=match):
        sigma_at(step, total, **base)


def test_check_schedule_rejects_a_schedule_that_never_fires():
    with pytest.raises(ValueError, match="sigma is 0 on every step"):
        check_schedule(1, **QERL)  # a 1-step run never leaves stage 0
    with pytest.raises(ValueError, match="never fire"):
        check_schedule(600, start_step=600, **QERL)  # resumed past the end
    assert sum(s > 0 for s in check_schedule(600, **QERL)) == 540
    assert check_schedule(3, schedule="constant", sigma_start=0.0) == [0.0, 0.0, 0.0]  # sigma_start 0: allowed
