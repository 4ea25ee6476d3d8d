"""AQN noise schedules: sigma as a pure function of the optimizer step.

``step`` is the optimizer step a rollout belongs to, counted from 0 (TRL's ``state.global_step`` while that step's
generation runs), and ``total_steps`` the planned number of steps. Four schedules:

    constant  sigma = sigma_start
    qerl      QeRL's stagewise geometric decay (NVlabs/QeRL trl_trainer/noise_scheduler.py):
              K = num_stages equal intervals, stage(step) = min(step * K // total_steps, K - 1);
              stage 0 -> sigma 0 (no noise while the run warms up), stage k >= 1 -> trend[k - 1] with
              trend[i] = sigma_start * (sigma_end / sigma_start) ** (i / (K - 2)),  i = 0 .. K - 2
              (so the last stage reaches sigma_end exactly; the paper's Eq. 8 divides by K - 1 and never does).
              1e-2 -> 1e-4, K = 10, 600 steps: 0 for steps 0-59, 1e-2 from 60, 5.62e-3 from 120, ... 1e-4 from 540.
    linear    sigma_start + (sigma_end - sigma_start) * t,            t = step / (total_steps - 1) clamped to [0, 1]
    cosine    sigma_end + (sigma_start - sigma_end) * (1 + cos(pi t)) / 2

`check_schedule` is the setup-time guard against two silent AQN failures seen in hand-rolled trainers: a step counter
never advanced (sigma stuck at 0), and a schedule that is 0 on every step of the run (an "epoch-aware" variant that
always asked for step 0 of 1).
"""

from __future__ import annotations

import enum
import math

from quarl import configio


class Schedule(enum.Enum):
    """How sigma evolves over the run (formulas in the module docstring)."""

    CONSTANT = "constant"
    QERL = "qerl"
    LINEAR = "linear"
    COSINE = "cosine"


def _schedule(schedule: Schedule | str) -> Schedule:
    if isinstance(schedule, Schedule):
        return schedule
    valid = [s.value for s in Schedule]
    if schedule not in valid:
        raise configio.unknown_key_error(str(schedule), valid, "AQN schedule")
    return Schedule(schedule)


def _qerl(step: int, total_steps: int, sigma_start: float, sigma_end: float, num_stages: int) -> float:
    k = num_stages
    stage = min(step * k // total_steps, k - 1)
    if stage == 0:
        return 0.0
    if k == 2:  # one noisy stage: trend = [sigma_start]
        return float(sigma_start)
    return float(sigma_start * (sigma_end / sigma_start) ** ((stage - 1) / (k - 2)))


def sigma_at(step: int, total_steps: int, *, schedule: Schedule | str = "qerl", sigma_start: float,
             sigma_end: float | None = None, num_stages: int = 10) -> float:
    """The AQN standard deviation for optimizer step ``step`` (0-based) of a ``total_steps``-step run.

    Args:
        step: the optimizer step (0 <= step; steps past the end keep the last value).
        total_steps: planned optimizer steps (>= 1).
        schedule: constant | qerl | linear | cosine (see the module docstring).
        sigma_start: sigma at the start (qerl: of stage 1).
        sigma_end: sigma at the end (required except for constant; qerl needs sigma_start, sigma_end > 0).
        num_stages: qerl's K (>= 2).

    Returns:
        sigma as a Python float (>= 0).

    >>> [round(sigma_at(s, 600, sigma_start=1e-2, sigma_end=1e-4), 6) for s in (0, 59, 60, 120, 539, 540, 599)]
    [0.0, 0.0, 0.01, 0.005623, 0.000178, 0.0001, 0.0001]
    """
    kind = _schedule(schedule)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if sigma_start < 0 or (sigma_end is not None and sigma_end < 0):
        raise ValueError(f"sigmas must be >= 0, got sigma_start={sigma_start}, sigma_end={sigma_end}")
    if kind is Schedule.CONSTANT:
        return float(sigma_start)
    if sigma_end is None:
        raise ValueError(f"schedule {kind.value!r} needs sigma_end")
    if kind is Schedule.QERL:
        if num_stages < 2:
            raise ValueError(f"qerl schedule needs num_stages >= 2, got {num_stages}")
        if sigma_start <= 0 or sigma_end <= 0:
            raise ValueError("qerl schedule is geometric: sigma_start and sigma_end must be > 0")
        return _qerl(step, total_steps, sigma_start, sigma_end, num_stages)
    t = min(step / (total_steps - 1), 1.0) if total_steps > 1 else 1.0
    if kind is Schedule.LINEAR:
        return float(sigma_start + (sigma_end - sigma_start) * t)
    return float(sigma_end + (sigma_start - sigma_end) * (1 + math.cos(math.pi * t)) / 2)


def check_schedule(total_steps: int, *, schedule: Schedule | str = "qerl", sigma_start: float,
                   sigma_end: float | None = None, num_stages: int = 10, start_step: int = 0) -> list[float]:
    """All sigmas of a run (steps ``start_step`` .. total_steps-1); raises if sigma_start > 0 but every one is 0.

    This is the setup-time error for an AQN that would never fire (e.g. a qerl schedule whose first noisy stage
    starts after the last step: total_steps < num_stages with a 1-step run, or a run resumed past the end).
    """
    sigmas = [sigma_at(s, total_steps, schedule=schedule, sigma_start=sigma_start, sigma_end=sigma_end,
                       num_stages=num_stages) for s in range(start_step, total_steps)]
    if sigma_start > 0 and not any(s > 0 for s in sigmas):
        raise ValueError(f"AQN is enabled with sigma_start={sigma_start} but sigma is 0 on every step "
                         f"{start_step}..{total_steps - 1} of this run (schedule={_schedule(schedule).value}, "
                         f"num_stages={num_stages}): the noise would never fire. Use more steps, fewer stages or "
                         "another schedule, or disable AQN.")
    return sigmas
