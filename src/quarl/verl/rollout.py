"""verl's vLLM worker extension with quarl: ``rollout.engine_kwargs.vllm.worker_extension_cls=
quarl.verl.rollout.QuarlWorkerExtension``.

verl names its extension class in the vLLM engine arguments and unpacks ``rollout.engine_kwargs.vllm`` after it, so
this subclass replaces it without a fork. It adds to verl's ``vLLMColocateWorkerExtension``:
- ``monkey_patch_model`` (called once after the engine starts): verl's patches, then `RolloutQuarl` on
  ``model_runner.model`` (injection on vLLM's ``*ParallelLinear`` layers, AQN on its ``RMSNorm`` gains);
- ``update_weights_from_ipc`` (one call per weight sync): noise off before, then `RolloutQuarl.after_sync`;
- ``_update_weights`` (once per received bucket): the injector's cached weights dropped after each load;
- ``quarl_validation(on)`` / ``quarl_set_step(step)`` / ``quarl_stats()``: for ``collective_rpc`` (validation
  without AQN; the trainer's step; telemetry);
- ``update_verl_delta_weights`` (verl's delta weight transfer bypasses ``_update_weights``): refused, loudly.
Importing it needs vLLM (verl's base class imports it), which is why it is its own module.
"""

from __future__ import annotations

import logging
from typing import Any

from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from quarl.verl.config import load_config
from quarl.verl.rollout_state import RolloutQuarl

logger = logging.getLogger(__name__)


class QuarlWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocated vLLM worker extension with quarl's rollout injection and AQN (see the module docstring)."""

    quarl: RolloutQuarl | None = None

    def _quarl_state(self) -> RolloutQuarl:
        if self.quarl is None:
            raise RuntimeError("quarl.verl: a weight sync reached the vLLM worker before monkey_patch_model attached "
                               "quarl; the rollout would run without the injection")
        return self.quarl

    def monkey_patch_model(self, vocab_size: int, banned_token_ids: list[int] | None = None):
        super().monkey_patch_model(vocab_size, banned_token_ids)
        model_config = getattr(getattr(self.model_runner, "vllm_config", None), "model_config", None)
        eager = getattr(model_config, "enforce_eager", None)
        self.quarl = RolloutQuarl(self.model_runner.model, load_config(), enforce_eager=eager)

    def update_weights_from_ipc(self, *args: Any, **kwargs: Any):
        state = self._quarl_state()
        state.before_sync()
        result = super().update_weights_from_ipc(*args, **kwargs)
        state.after_sync()
        return result

    def _update_weights(self, weights, peft_config, base_sync_done):
        result = super()._update_weights(weights, peft_config=peft_config, base_sync_done=base_sync_done)
        self._quarl_state().invalidate()
        return result

    def update_verl_delta_weights(self, update_info: dict) -> None:
        raise RuntimeError("quarl.verl does not support verl's delta weight transfer (it loads weights outside "
                           "_update_weights, where quarl refreshes its cache and AQN); use the default "
                           "checkpoint engine")

    def quarl_validation(self, on: bool) -> None:
        """``collective_rpc("quarl_validation", args=(True,))`` before validation, ``(False,)`` after."""
        self._quarl_state().set_validation(on)

    def quarl_set_step(self, step: int) -> None:
        """``collective_rpc("quarl_set_step", args=(step,))``: the optimizer step the next rollouts serve."""
        self._quarl_state().set_step(step)

    def quarl_stats(self) -> dict[str, Any]:
        """Rollout telemetry of this worker (``collective_rpc("quarl_stats")``)."""
        return self._quarl_state().telemetry()
