"""What `QuarlGRPOTrainer` adds to TRL's trainer: frozen options from the config, and the attached perturbations.

`TrainerOptions` holds the settings (built once from a `TrainConfig`, never changed). `Attached` holds the objects
attached to the models -- the injector and AQN on the policy, and on vLLM's copy of the model when TRL generates with
vLLM -- and the one piece of per-step state, the last AQN application's statistics (logged with the step's metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from quarl.rl.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
    """The trainer's settings (each from the config key named in its comment)."""

    tis_cap: float | None = None  # grpo.tis_cap: truncated importance sampling of the advantages (None = off)
    mismatch_cap: float = 2.0  # grpo.mismatch_cap: the ratio cap of the mismatch metrics when TIS is off
    reference_unquantized: bool = False  # grpo.reference == unquantized: the beta-KL reference runs without injection
    distill: float = 0.0  # grpo.distill: weight of the full-distribution KL to the unquantized base (0 = off)
    distill_divergence: str = "forward"  # grpo.distill_divergence
    norms_lr: float | None = None  # lora.norms_lr: lr of the trainable RMSNorm gains (None = the run's lr)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> TrainerOptions:
        g = cfg.grpo
        return cls(tis_cap=g.tis_cap, mismatch_cap=g.mismatch_cap, reference_unquantized=g.reference == "unquantized",
                   distill=g.distill, distill_divergence=g.distill_divergence, norms_lr=cfg.lora.norms_lr)


@dataclasses.dataclass
class Attached:
    """The injector and AQN attached to the policy (None = off), their vLLM counterparts once TRL built its engine,
    and the statistics of the last AQN application."""

    injector: Any = None
    aqn: Any = None
    vllm_injector: Any = None
    vllm_aqn: Any = None
    aqn_stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """The policy injector's phase ``name`` for the block (nothing without an injection)."""
        return self.injector.phase(name) if self.injector is not None else contextlib.nullcontext()

    def unquantized(self) -> contextlib.AbstractContextManager:
        """The policy with its injection bypassed for the block."""
        return self.injector.bypassed() if self.injector is not None else contextlib.nullcontext()
