"""``grpo.use_vllm``: TRL's colocated vLLM generation with quarl's injection and AQN attached to vLLM's model.

TRL builds ``vllm.LLM(...)`` itself with fixed keyword arguments (``VLLMGeneration._init_vllm``,
https://github.com/huggingface/trl/blob/v1.16.0/trl/generation/vllm_generation.py#L347), without ``enforce_eager``;
CUDA graphs / torch.compile would then replay kernels and skip Python forward hooks, so the injection would silently
not apply to the rollouts. `patch_llm_eager` wraps TRL's module-level ``LLM`` so that it is built with
``enforce_eager=True``, before the trainer is constructed.

After construction, `attach_to_vllm` finds the nn.Module TRL loads weights through
(``llm.llm_engine.model_executor.driver_worker.model_runner.model``, colocate mode only: in server mode the model
lives in another process) and attaches a second `Injector` (phase ``rollout``, for good) -- the default
``target_classes=("*Linear",)`` matches vLLM's ``QKVParallelLinear`` / ``RowParallelLinear`` / ``MergedColumnParallel
Linear`` -- and, when AQN is on, an `AQN` on vLLM's own ``RMSNorm`` gains (``*RMSNorm*``).

Weight syncs. TRL's ``VLLMGeneration.sync_weights`` loads the training weights into vLLM's model through vLLM's
weight loaders, which write with ``param.data.copy_(...)``: that bumps neither the Parameter's ``_version`` nor its
data pointer, so the injector's weight cache cannot see the write by itself (`quarl.inject.weights`).
`invalidate_after_sync` wraps the engine's ``sync_weights`` so that every sync, whoever calls it, ends with
``injector.invalidate_weights()``: the next rollout re-quantizes the new weights. AQN noise is applied after the sync
of each step (`quarl.rl.rollout` syncs first, then noises, then generates). Sleep mode (which syncs inside
``generate``) is refused. Rollout log-probs come from vLLM (``processed_logprobs``); with ``grpo.tis_cap`` TRL's own
token-level truncated IS is used (``token_truncate``).

Needs CUDA and ``vllm`` (TRL pins ``vllm>=0.22,<=0.31``); tested by a ``gpu`` test that skips cleanly here, and the
sync invalidation by a CPU test on a plain module tree.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


def patch_llm_eager() -> None:
    """Make TRL build its vLLM engine with ``enforce_eager=True`` (Python hooks must run on every forward)."""
    import trl.generation.vllm_generation as vg

    if getattr(vg.LLM, "_quarl_eager", False):
        return
    eager = functools.partial(vg.LLM, enforce_eager=True)
    eager._quarl_eager = True  # type: ignore[attr-defined]
    vg.LLM = eager


def vllm_args(tis_cap: float | None) -> dict[str, Any]:
    """GRPOConfig fields for the colocated vLLM path (IS correction only when TIS was asked for)."""
    out: dict[str, Any] = {"vllm_mode": "colocate", "vllm_enable_sleep_mode": False,
                           "vllm_importance_sampling_correction": tis_cap is not None}
    if tis_cap is not None:
        out.update(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_cap=tis_cap)
    return out


def vllm_model(trainer: Any) -> Any:
    """The colocated vLLM engine's nn.Module (the one TRL loads weights into)."""
    return trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.model


def attach_to_vllm(trainer: Any, spec: Any, aqn_cfg: Any, total_steps: int, start_step: int) -> tuple[Any, Any]:
    """Attach the injection (phase rollout) and AQN to vLLM's model; returns (injector or None, AQN or None)."""
    from quarl.inject import attach
    from quarl.noise import AQN

    model = vllm_model(trainer)
    injector = attach(model, spec, phase="rollout") if spec is not None else None
    if injector is not None:
        invalidate_after_sync(trainer.vllm_generation, injector)
    aqn = AQN(model, aqn_cfg, total_steps, start_step) if aqn_cfg is not None and aqn_cfg.enabled else None
    logger.info("vLLM rollout model %s: %d injected modules, %d AQN modules", type(model).__name__,
                len(injector.modules) if injector else 0, len(aqn.modules) if aqn else 0)
    return injector, aqn


def invalidate_after_sync(generation: Any, injector: Any) -> None:
    """Make every ``generation.sync_weights()`` end with ``injector.invalidate_weights()`` (an instance attribute
    wrapping the bound method; see the module docstring for why the weight cache needs it)."""
    sync = generation.sync_weights
    if getattr(sync, "_quarl_invalidates", None) is injector:
        return

    @functools.wraps(sync)
    def sync_weights(*args: Any, **kwargs: Any) -> Any:
        out = sync(*args, **kwargs)
        injector.invalidate_weights()
        logger.debug("vLLM weight sync: rollout injector's weight cache invalidated")
        return out

    sync_weights._quarl_invalidates = injector  # type: ignore[attr-defined]
    generation.sync_weights = sync_weights
