"""What a `quarl train` run records: validation, ``metrics.jsonl``, TensorBoard, heartbeat and the progress bar.

`Validator` evaluates the held-out set greedily under the *declared* quantization (the run's own injector, phase
``rollout``; AQN off unless ``eval.aqn``) and takes the quantization actually applied from the injector's telemetry
(hook fires during the evaluation), raising if a declared rollout injection never fired: an accuracy measured without
the quantization it claims would be reported as the quantized one.

`RunRecorder` is a ``TrainerCallback``: on every optimizer step it times the step, validates on eval steps (every
``eval.every`` and always at the final step), and on TRL's log event writes one JSON row per step to
``metrics.jsonl`` (TRL names mapped to quarl's: ``reward`` -> ``reward/mean`` ...), the same scalars to TensorBoard,
and the heartbeat. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from quarl.eval.harness import run_eval
from quarl.eval.results import source_metrics
from quarl.inject.spec import Phase
from quarl.runs import registry

logger = logging.getLogger(__name__)
_RENAME = {"reward": "reward/mean", "reward_std": "reward/std", "learning_rate": "lr",
           "completions/mean_length": "completion_length"}
_DROP = ("epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss")


class Validator:
    """Greedy held-out accuracy of the training model under the run's declared rollout quantization."""

    def __init__(self, model: Any, tokenizer: Any, problems: list, attached: Any, cfg: Any,
                 out_dir: Path | None) -> None:
        """``attached``: the run's `quarl.rl.options.Attached` (injector, AQN); ``cfg``: its `TrainConfig`."""
        self.model, self.tokenizer, self.problems, self.attached, self.cfg = model, tokenizer, problems, attached, cfg
        self.out_dir = out_dir
        self.eval_cfg = cfg.validation()

    def _fires(self) -> dict[str, int]:
        inj = self.attached.injector
        return {} if inj is None else {k: v["fires"].get("rollout", 0) for k, v in inj.stats().items()}

    def __call__(self, step: int) -> dict[str, Any]:
        before = self._fires()
        t0 = time.perf_counter()
        noise = self.attached.aqn.noised(step) if self.cfg.eval.aqn and self.attached.aqn is not None else nullcontext()
        with self.attached.phase("rollout"), noise:
            result = run_eval(self.model, self.tokenizer, self.problems, self.eval_cfg, progress=False)
        row = self._row(result, self._applied(before))
        row["val/time_s"] = time.perf_counter() - t0
        if self.out_dir is not None:
            self._write_problems(step, result.samples)
        return row

    def _applied(self, before: dict[str, int]) -> dict[str, Any]:
        inj = self.attached.injector
        if inj is None:
            return {"val/quant_modules": 0, "val/quant_fires": 0}
        after = self._fires()
        fired = {k: after[k] - before.get(k, 0) for k in after}
        if inj.spec.apply_during.covers(Phase.ROLLOUT):
            missing = [k for k, n in fired.items() if n == 0]
            if missing:
                raise RuntimeError(f"validation ran without the declared quantization: {len(missing)} injected "
                                   f"modules never fired ({', '.join(missing[:5])})")
        return {"val/quant_modules": sum(1 for n in fired.values() if n), "val/quant_fires": sum(fired.values())}

    def _row(self, result: Any, applied: dict[str, Any]) -> dict[str, Any]:
        by_source = result.metrics["by_source"]  # quarl.eval's accuracy block (Wilson CIs for one sample each)
        m = next(iter(by_source.values())) if len(by_source) == 1 else source_metrics(result.samples)
        row: dict[str, Any] = {"val/n": len(result.samples)}
        for kind in ("strict", "flexible"):
            acc = m[kind]["mean@1"]
            row.update({f"val/acc_{kind}": acc["value"], f"val/acc_{kind}_lo": acc["ci_low"],
                        f"val/acc_{kind}_hi": acc["ci_high"]})
        row["val/format_rate"] = m["format_rate"]["value"]
        row.update({k: v for k, v in result.metrics["verl"].items() if k.startswith("val-core/")})
        row.update(applied)
        return row

    def _write_problems(self, step: int, samples: list) -> None:
        path = self.out_dir / "eval" / f"step-{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for s in samples:
                f.write(json.dumps({"id": s.id, "correct_strict": s.correct_strict,
                                    "correct_flexible": s.correct_flexible, "n_tokens": s.n_tokens}) + "\n")


class RunRecorder(TrainerCallback):
    """Per-step timing, validation, metrics.jsonl / TensorBoard rows, heartbeat and progress (see module docstring)."""

    def __init__(self, run_dir: Path, validator: Validator, every: int, total_steps: int, main: bool,
                 start_step: int = 0) -> None:
        self.run_dir, self.validator, self.every, self.total = run_dir, validator, every, total_steps
        self.main = main
        self._t0: float | None = None
        self._pending: dict[str, Any] = {}
        self._last_val: float | None = None
        self._tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not main,
                        dynamic_ncols=True)

    def write_row(self, row: dict[str, Any]) -> None:
        """Append one step's row to metrics.jsonl and TensorBoard (main process only)."""
        if not self.main:
            return
        registry.append_metrics(self.run_dir, row)  # also ends a line a killed writer left unterminated
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb"))
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, row["step"])
        self._tb.flush()
        if "val/acc_strict" in row:
            self._last_val = row["val/acc_strict"]

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        self._pending = {"time/s_per_step": time.perf_counter() - (self._t0 or time.perf_counter())}
        if self.main and (step % self.every == 0 or step >= self.total):
            self._pending.update(self.validator(step))
        control.should_log = True  # one row per step, also when TRL's logging_steps would skip it

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.main or logs is None or "loss" not in logs and "reward" not in logs:
            return
        row = {"step": state.global_step}
        row.update({_RENAME.get(k, k): v for k, v in logs.items() if k not in _DROP})
        row.update(self._pending)
        self._pending = {}
        self.write_row(row)
        registry.heartbeat(self.run_dir, state.global_step, self.total)
        self.bar.update(state.global_step - self.bar.n)
        post = {"reward": f"{row.get('reward/mean', float('nan')):.3f}", "s/step": f"{row['time/s_per_step']:.1f}"}
        if self._last_val is not None:
            post["val"] = f"{self._last_val:.3f}"
        if "aqn/sigma" in row:
            post["sigma"] = f"{row['aqn/sigma']:.2g}"
        self.bar.set_postfix(post)

    def close(self) -> None:
        self.bar.close()
        if self._tb is not None:
            self._tb.close()
