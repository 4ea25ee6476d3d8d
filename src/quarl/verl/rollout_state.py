"""quarl on verl's vLLM rollout model: injection, AQN with the step's sigma, and the checks around weight syncs.

`RolloutQuarl` holds what the worker extension (`quarl.verl.rollout`) attaches to vLLM's model; it imports nothing
from verl or vLLM, so its policy is testable on any module tree that uses vLLM's class names.

Per weight sync (verl syncs once at start -- its ``global_steps`` 0 -- and once after every actor update):
1. `before_sync`: AQN's noise is taken off (the clean weights restored bit-exactly), so that whatever the sync does not
   overwrite -- every RMSNorm gain on a LoRA-only sync -- is clean again, never noise on noise;
2. every loaded bucket: `invalidate` drops the injector's cached quantized weights (vLLM's loaders write with
   ``param.data.copy_``, which bumps no version counter);
3. `after_sync`: the step moves on by one (sync k serves the rollouts of optimizer step k: verl syncs before its
   first step and after each update); the cache is invalidated once more and AQN is re-applied from the clean
   weights with ``sigma(step)`` and that step's seed -- on LoRA-only syncs too (the fork's noise was never refreshed
   there, and its sigma stayed at 0). `set_step` takes the step from verl's trainer (``global_steps - 1``, sent by
   `quarl.verl.agent_loop` before each training batch), so a resumed run or a re-sync during validation does not
   shift the schedule.
Validation (`set_validation`) takes the noise off until it ends: validation measures the quantized policy, not the
noise. The phase is ``rollout`` for good.

Loud failures: vLLM with CUDA graphs / torch.compile (``enforce_eager`` false) replays kernels without calling the
Python hooks, so the injection would silently not apply -- refused at attach with the fix
(``actor_rollout_ref.rollout.enforce_eager=True``); and from the second sync on, an injector whose declared modules
never fired in a rollout is an error naming the same fix (and vLLM LoRA layers, which call their base layer's
kernel directly, bypassing its hooks: use ``actor_rollout_ref.model.lora.merge=True``).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from torch import nn

from quarl.inject import attach
from quarl.noise import AQN
from quarl.verl.config import VerlQuarlConfig

logger = logging.getLogger(__name__)
EAGER_FIX = "actor_rollout_ref.rollout.enforce_eager=True"


class RolloutQuarl:
    """Injection + AQN on one vLLM model, driven by weight syncs (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: VerlQuarlConfig, enforce_eager: bool | None) -> None:
        if enforce_eager is False and cfg.injection is not None:
            raise RuntimeError("quarl.verl: vLLM was started with CUDA graphs / torch.compile (enforce_eager=False): "
                               "they replay kernels without calling quarl's hooks, so the rollout would run "
                               f"unquantized. Set {EAGER_FIX}")
        self.cfg = cfg
        self.injector = attach(model, cfg.injection, phase="rollout") if cfg.injection is not None else None
        self.aqn = AQN(model, cfg.aqn, cfg.total_steps) if cfg.aqn_enabled else None
        self.syncs = 0
        self.step: int | None = None
        self.validating = False
        self._noise = contextlib.ExitStack()
        self.last: dict[str, float] = {}
        logger.info("quarl.verl rollout: %d injected modules, %d AQN modules (config %s)",
                    len(self.injector.modules) if self.injector else 0, len(self.aqn.modules) if self.aqn else 0,
                    cfg.digest())

    @property
    def noised(self) -> bool:
        """True while AQN noise is on the weights."""
        return bool(self._noise._exit_callbacks)

    def _clear_noise(self) -> None:
        self._noise.close()  # AQN.noised's exit: copy_ the snapshot back, checked bit for bit

    def _apply_noise(self) -> None:
        if self.aqn is None or self.step is None or self.validating or self.noised:
            return
        self.last = dict(self._noise.enter_context(self.aqn.noised(self.step)))

    def before_sync(self) -> None:
        """Take AQN's noise off before new weights arrive."""
        self._clear_noise()

    def invalidate(self) -> None:
        """Drop cached quantized weights (after every loaded bucket)."""
        if self.injector is not None:
            self.injector.invalidate_weights()

    def after_sync(self) -> dict[str, float]:
        """The sync is complete: check the hooks fired since the first sync, then re-apply AQN for the new step."""
        self.syncs += 1
        if self.syncs >= 2:
            self.check_fired()
        self.step = 0 if self.step is None else self.step + 1
        self.invalidate()
        self._apply_noise()
        self.last = {**self.telemetry(), **self.last}
        logger.info("quarl.verl rollout sync %d (step %d): %s", self.syncs, self.step, self.last)
        return self.last

    def check_fired(self) -> None:
        """Raise when declared injections never fired in a rollout (with the fixes in the message)."""
        if self.injector is None:
            return
        missing = self.injector.never_fired("rollout")
        if missing:
            raise RuntimeError(f"quarl.verl: {len(missing)}/{len(self.injector.modules)} injected vLLM modules never "
                               f"ran their hooks in a rollout (e.g. {', '.join(missing[:3])}). With CUDA graphs or "
                               f"torch.compile the hooks are skipped: set {EAGER_FIX}. vLLM LoRA layers call their "
                               "base layer's kernel directly: set actor_rollout_ref.model.lora.merge=True")

    def set_step(self, step: int) -> None:
        """The optimizer step the next rollouts serve, from verl's trainer (``global_steps - 1``): the noise is
        re-drawn for it when it differs from the sync count's (a resumed run, a re-sync during validation)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"quarl.verl: the rollout step must be an int >= 0, got {step!r}")
        if step == self.step:
            return
        logger.info("quarl.verl rollout: step %s -> %d (from the trainer)", self.step, step)
        self._clear_noise()
        self.step = step
        self._apply_noise()

    def set_validation(self, on: bool) -> None:
        """Validation generates without AQN noise; turning it off restores the step's noise."""
        self.validating = bool(on)
        if self.validating:
            self._clear_noise()
        else:
            self._apply_noise()

    def telemetry(self) -> dict[str, Any]:
        """Flat metrics: rollout fires, injected modules, AQN sigma / modules noised, step, syncs."""
        out: dict[str, Any] = {"quarl/rollout/syncs": self.syncs, "quarl/rollout/step": self.step,
                               "quarl/rollout/aqn_on": float(self.noised)}
        if self.injector is not None:
            stats = self.injector.stats()
            out["quarl/rollout/modules"] = len(stats)
            out["quarl/rollout/fires"] = sum(s["fires"].get("rollout", 0) for s in stats.values())
        if self.aqn is not None and self.noised:
            out.update({"quarl/rollout/aqn_sigma": self.aqn.last.get("aqn/sigma", 0.0),
                        "quarl/rollout/aqn_modules": self.aqn.last.get("aqn/modules", 0)})
        return out
