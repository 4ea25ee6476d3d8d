"""Fabricate run directories exactly as the trainer writes them (run.json, heartbeat, exit, metrics, eval files).

The registry, tables and plots are tested against these, so they do not need the trainer.
Not a test module; pytest puts this directory on sys.path (rootdir conftest, no __init__), so tests import it
as `_fabricate`.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import yaml

from quarl.runs import registry as R

BASE_CONFIG = {
    "model": {"name": "testbed:tiny"},
    "data": {"source": "synthetic", "n_train": 256, "n_val": 64},
    "injection": {"scheme": "W4A4", "error_type": "mxfp4", "injection_point": "both", "apply_during": "both",
                  "use_ste": True},
    "aqn": {"enabled": True, "sigma_start": 0.01, "sigma_end": 0.0001, "num_stages": 4},
    "lora": {"r": 8, "alpha": 16},
    "grpo": {"lr": 1e-4, "steps": 8, "group_size": 4},
    "eval": {"every": 4, "n": 64},
    "run": {"seed": 0, "name": None, "checkpoint_every": 4},
}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def make_run(root: Path, *, config: dict | None = None, seed: int = 0, name: str | None = None,
             val: dict[int, float] | None = None, status: str = "finished", steps: int = 8,
             n_problems: int = 40, rewards: dict[int, float] | None = None, sigma: bool = True) -> Path:
    """A run directory under ``root`` named by run_id, with metrics and per-problem eval files.

    ``val`` maps step -> strict accuracy; per-problem correctness is the first round(acc * n) problems correct.
    ``status``: finished | failed | killed | running (running: this process's pid owns the heartbeat).
    """
    config = copy.deepcopy(config or BASE_CONFIG)
    config["run"] = {**config.get("run", {}), "seed": seed, "name": name}
    return write_run(root / R.run_id(config, seed, name), config, val=val, status=status, steps=steps,
                     n_problems=n_problems, rewards=rewards, sigma=sigma)


def write_run(run_dir: Path, config: dict, *, val: dict[int, float] | None = None, status: str = "finished",
              steps: int = 8, n_problems: int = 40, rewards: dict[int, float] | None = None,
              sigma: bool = True) -> Path:
    """Write a run the way the trainer does into ``run_dir`` (config: resolved, with run.seed / run.name)."""
    seed, name = config["run"]["seed"], config["run"]["name"]
    R.create_run(run_dir, {"name": name, "seed": seed, "config_hash": R.config_hash(config)})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    val = {0: 0.30, steps: 0.40} if val is None else val
    rewards = rewards or {}
    (run_dir / "eval").mkdir()
    for step in range(steps + 1):
        row = {"step": step}
        if step:
            row.update({"reward/mean": rewards.get(step, 0.2 + 0.02 * step), "reward/std": 0.1, "loss": 0.01,
                        "mismatch/kl": 0.001 * step, "time/s_per_step": 1.5})
            if sigma:
                row["aqn/sigma"] = 0.01 / step
        if step in val:
            acc = val[step]
            k = round(acc * n_problems)
            row.update({"val/acc_strict": k / n_problems, "val/acc_flexible": min(1.0, (k + 2) / n_problems),
                        "val/n": n_problems})
            with open(run_dir / "eval" / f"step-{step}.jsonl", "w") as f:
                for i in range(n_problems):
                    f.write(json.dumps({"id": f"p{i}", "correct_strict": i < k, "correct_flexible": i < k + 2}) + "\n")
        R.append_metrics(run_dir, row)
        if status != "killed" or step < steps:
            R.heartbeat(run_dir, step, steps)
    if status in ("finished", "failed"):
        R.mark_exit(run_dir, status, steps, error="boom" if status == "failed" else None)
    elif status == "killed":
        hb = json.loads((run_dir / "heartbeat.json").read_text())
        hb["pid"] = dead_pid()
        (run_dir / "heartbeat.json").write_text(json.dumps(hb))
    return run_dir


def fake_resolve(base, overrides) -> dict:
    """Stand-in for the trainer's config resolution: base + ``key=value`` overrides; unknown blocks are errors."""
    cfg = copy.deepcopy(base if isinstance(base, dict) else yaml.safe_load(Path(base).read_text()))
    for item in overrides:
        key, raw = item.split("=", 1)
        *parents, leaf = key.split(".")
        if parents and parents[0] not in BASE_CONFIG:
            raise ValueError(f"unknown key {parents[0]!r}")
        node = cfg
        for k in parents:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
        node[leaf] = yaml.safe_load(raw)
    return cfg


def fake_train(config, overrides, out_dir, resume) -> Path:
    """Stand-in for quarl.rl.train: writes a finished run whose gain is grpo.effect points (+ a seed jitter).

    grpo.crash: true raises; a resumed run gets its final validation and is marked finished.
    """
    if resume is not None:
        assert config is None and not overrides and out_dir is None, "quarl.rl.train refuses these with resume"
        rows = R.read_metrics(resume)
        last = rows[-1]["step"]
        R.clear_exit(resume)
        R.heartbeat(resume, last + 1, last + 1)
        R.append_metrics(resume, {"step": last + 1, "val/acc_strict": 0.5, "val/acc_flexible": 0.5, "val/n": 1000})
        R.mark_exit(resume, "finished", last + 1)
        return Path(resume)
    cfg = fake_resolve(config, overrides)
    if cfg["grpo"].get("crash"):
        raise RuntimeError("boom: the fake trainer crashed")
    effect = float(cfg["grpo"].get("effect", 0.0))
    seed = cfg["run"]["seed"]
    final = 0.30 + (effect + 0.5 * (seed % 3 - 1)) / 100
    return write_run(Path(out_dir), cfg, val={0: 0.30, 4: (0.30 + final) / 2, 8: final}, n_problems=1000)
