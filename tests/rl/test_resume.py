"""SIGKILL mid-run, `quarl train --resume`, and the same metrics as an uninterrupted run of the same seed.

Tolerance: the rows after the resume point must be identical -- rewards and validation accuracies exactly, losses,
grad norms and mismatch statistics to 1e-6 relative. Both runs execute in fresh processes with one thread on the
same machine, so the float reductions are the same; TRL restores the optimizer, scheduler, RNG states and the data
position, and quarl's AQN noise is a pure function of (seed, step). The first resumed step regenerates (TRL resets
its generation buffer), which is exact here because every step generates (one update per generation batch).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from quarl.runs import read_metrics, run_status

CONFIG = """
injection: {scheme: MXFP4}
aqn: {schedule: constant, sigma_start: 0.01}
grpo: {steps: 5, prompts_per_step: 4, generations: 2, max_new_tokens: 40}
data: {train_n: 64}
eval: {every: 2, n: 8, batch_size: 8}
run: {seed: 3, checkpoint_every: 2}
"""
EXACT = ("reward/mean", "val/acc_strict", "val/acc_flexible", "completion_length")
CLOSE = ("loss", "grad_norm", "mismatch/kl", "aqn/noise_norm", "entropy")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(*args):
    return [sys.executable, "-m", "quarl", "train", *map(str, args)]


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    full, killed = tmp_path / "a" / "full", tmp_path / "b" / "killed"  # one config + seed per runs root
    subprocess.run(_train(cfg, "--out", full), env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_train(cfg, "--out", killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "checkpoint-2" / "quarl_complete"
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.02)
    if proc.poll() is not None:
        pytest.fail("the run ended before it could be killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_status(killed).value == "killed"  # computed from the files: heartbeat of a dead process, no exit record

    resumed = subprocess.run(_train("--resume", killed), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_status(killed).value == "finished"
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(killed)}
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4, 5]  # rows after checkpoint 2 were dropped and recomputed
    for step in (3, 4, 5):
        for key in EXACT:
            assert (key in a[step]) == (key in b[step]), (step, key)
            if key in a[step]:
                assert a[step][key] == b[step][key], (step, key)
        for key in CLOSE:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-12), (step, key)
    assert (killed / "eval" / "step-5.jsonl").read_text() == (full / "eval" / "step-5.jsonl").read_text()
    log = (killed / "train.log").read_text()  # `quarl train` sets quarl's logger to INFO (cli.train.process_settings)
    assert "INFO quarl.rl.run: train:" in log and "resume: AQN restored from" in log
