"""verl's FSDP engine with quarl's injection attached to the policy, after LoRA and before FSDP wrapping.

verl's ``FSDPEngine._build_model_optimizer`` runs ``_build_module`` -> ``_build_lora_module`` -> ``_apply_qat`` ->
``_build_fsdp_module``. `QuarlFSDPEngineWithLMHead._build_fsdp_module` attaches quarl to the module it receives and
then calls verl's: the hooks sit on the ``base_layer`` of every LoRA-wrapped linear (LoRA adapters are never
quantized, `quarl.inject.select`), FSDP2 wraps the hooked modules (a pre-hook inside an FSDP2 module sees the
gathered, full weight), and everything else -- optimizer, checkpoints, weight export to the rollout -- is verl's.

Policy: phase ``training`` for good (the actor only computes log-probs and gradients), STE required (checked by
`quarl.verl.config`), AQN never on the actor (it is a rollout-only perturbation). The reference engine is built by the
same class with ``forward_only=True``: by default it is injected like the policy (``quarl.reference: policy``, so the
KL term compares two models under the same quantization), or left unquantized (``reference: unquantized``).

Weight cache. The injector caches each quantized weight; FSDP2 writes stepped values into its gather buffers without
bumping a version counter, and quarl's injector re-checks cached weights after every optimizer step and phase change
(`quarl.inject.weights`), so no call is needed here. Memory: the cache holds a full-size (gathered) quantized copy of
every injected weight on every rank, whatever the FSDP2 sharding (docs/verl.md gives the formula and measurements).

Telemetry: ``train_batch`` adds ``quarl/actor/fires``, ``quarl/actor/skipped``, ``quarl/actor/modules`` and
``quarl/actor/weight_computations`` to verl's metrics of the step; an injector that did not fire in a training step is
an error.
"""

from __future__ import annotations

import logging
from typing import Any

from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from quarl.inject import attach
from quarl.verl.config import load_config

logger = logging.getLogger(__name__)


def _counts(injector: Any) -> dict[str, float]:
    stats = injector.stats()
    fires = sum(s["fires"].get("training", 0) for s in stats.values())
    skipped = sum(s["skipped"].get("training", 0) for s in stats.values())
    computed = sum(s.get("weight_computations", 0) for s in stats.values())
    return {"quarl/actor/fires": float(fires), "quarl/actor/skipped": float(skipped),
            "quarl/actor/modules": float(len(stats)), "quarl/actor/weight_computations": float(computed)}


class QuarlFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's ``FSDPEngineWithLMHead`` with quarl attached in ``_build_fsdp_module`` (see the module docstring)."""

    quarl_injector = None
    quarl_config = None

    def _build_fsdp_module(self, module):
        cfg = load_config()
        self.quarl_config = cfg
        forward_only = bool(self.engine_config.forward_only)
        if cfg.injection is None:
            logger.info("quarl.verl: no injection block; the %s engine runs unquantized",
                        "reference" if forward_only else "actor")
        elif forward_only and cfg.reference == "unquantized":
            logger.info("quarl.verl: reference engine left unquantized (quarl.reference: unquantized)")
        else:
            self.quarl_injector = attach(module, cfg.injection, phase="training", cache_weights=cfg.cache_weights)
            logger.info("quarl.verl: %s on %d modules of the %s engine (config %s)", cfg.injection.error_type,
                        len(self.quarl_injector.modules), "reference" if forward_only else "actor", cfg.digest())
        return super()._build_fsdp_module(module)

    def train_batch(self, data, loss_function):
        before = _counts(self.quarl_injector) if self.quarl_injector is not None else None
        outputs = super().train_batch(data, loss_function)
        if self.quarl_injector is not None:
            after = _counts(self.quarl_injector)
            step = {k: after[k] - before[k] for k in ("quarl/actor/fires", "quarl/actor/skipped")}
            if step["quarl/actor/fires"] + step["quarl/actor/skipped"] == 0:
                raise RuntimeError("quarl.verl: a training step ran but no injected module was called: the hooks "
                                   "are not on the modules verl runs (a replaced or compiled model?)")
            if isinstance(outputs, dict) and isinstance(outputs.get("metrics"), dict):
                outputs["metrics"].update({**step, "quarl/actor/modules": after["quarl/actor/modules"],
                                           "quarl/actor/weight_computations": after["quarl/actor/weight_computations"]})
        return outputs
