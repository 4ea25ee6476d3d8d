"""s/step of `quarl train` vs a plain TRL ``GRPOTrainer`` on the same config, and with MXFP4 W4A4.

    python benchmarks/train_speed.py [--steps 6] [--threads 1]

Same model (testbed + PEFT LoRA r16 on all projections), same TRL GRPOConfig (quarl builds it: 16 prompts x 8,
160 new tokens), same seed. The plain TRL trainer gets the same reward function and nothing else. quarl adds its
phase switch, rollout log-prob capture, the mismatch metrics (from the loss forward since session 3; an extra
no-grad forward only with TIS), health metrics
and its run recording; validation time is excluded (it is not part of a step). The arms alternate step blocks in
one process so machine load hits them alike; the first step of each arm is dropped (warm-up). Prints median s/step
and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

BASE = ["grpo.prompts_per_step=16", "grpo.generations=8", "eval.n=8", "eval.every=1000", "run.checkpoint_every=0",
        "data.train_n=2048"]


class _Timer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def _plain_trl(steps: int, out: Path) -> list[float]:
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOTrainer

    from quarl.data.sources import load_source
    from quarl.models import load_model
    from quarl.rl import load_config
    from quarl.rl.run import _lora, _prompts, _rewards, _trl_args

    cfg = load_config(None, BASE + [f"grpo.steps={steps}"])
    set_seed(cfg.run.seed)
    model, tok = load_model(cfg.model.name)
    model = _lora(model, cfg)
    rows = _prompts(tok, load_source("synthetic", cfg.data.train_n, "train"))
    funcs, _ = _rewards(cfg)
    timer = _Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=_trl_args(cfg, out), train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[timer])
    trainer.train()
    return timer.times


def _quarl(steps: int, out: Path, extra: list[str]) -> list[float]:
    from quarl.rl import load_config
    from quarl.rl.run import _build

    cfg = load_config(None, BASE + extra + [f"grpo.steps={steps}"])
    out.mkdir(parents=True)
    (out / "metrics.jsonl").touch()
    trainer, recorder, _, _ = _build(cfg, out, 0)
    timer = _Timer()
    trainer.add_callback(timer)
    trainer.train()
    recorder.close()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="quarl-speed-"))
    arms = {"TRL GRPOTrainer (plain)": lambda i: _plain_trl(args.steps, tmp / f"trl{i}"),
            "quarl train, no injection": lambda i: _quarl(args.steps, tmp / f"q{i}", []),
            "quarl train, MXFP4 W4A4": lambda i: _quarl(args.steps, tmp / f"w{i}", ["injection.scheme=MXFP4"]),
            "quarl train, NVFP4 W4A4": lambda i: _quarl(args.steps, tmp / f"n{i}", ["injection.scheme=NVFP4"])}
    times: dict[str, list[float]] = {k: [] for k in arms}
    for rep in range(2):  # two alternating blocks per arm
        for name, fn in arms.items():
            times[name] += fn(rep)[1:]
            print(f"[{rep}] {name}: {statistics.median(times[name]):.2f} s/step so far", flush=True)
    ref = statistics.median(times["TRL GRPOTrainer (plain)"])
    print(f"\n{'arm':32s} {'s/step':>8s} {'vs TRL':>8s}   ({args.threads} thread(s), 16 prompts x 8, median)")
    for name, t in times.items():
        print(f"{name:32s} {statistics.median(t):8.2f} {statistics.median(t) / ref:7.2f}x")


if __name__ == "__main__":
    main()
