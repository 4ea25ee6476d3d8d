"""The ``quarl:`` block of a verl run, and the seam that brings it to every worker.

One YAML file holds one top-level ``quarl:`` block with the same schema as ``quarl train``'s ``injection`` and
``aqn`` blocks (`quarl.inject.InjectionSpec`, `quarl.noise.AQNConfig`) plus what only verl needs:

    quarl:
      injection: {scheme: W4A4, error_type: nvfp4, apply_during: both}   # null / absent = no injection
      aqn: {schedule: qerl, sigma_start: 0.01, sigma_end: 0.0001, num_stages: 10}  # null / absent = no AQN
      total_steps: 300          # the AQN schedule's length: verl's trainer.total_training_steps
      reference: policy         # the reference engine: policy (injected like the actor) | unquantized
      cache_weights: true       # keep quantized weights between forwards (false: no full-size copy per rank)

The seam. verl 0.9.1 starts actor, reference and rollout workers as Ray actors, and vLLM's workers as
subprocesses of the rollout server; the one channel that reaches all of them unchanged is the process environment:
``+ray_kwargs.ray_init.runtime_env.env_vars.QUARL_VERL_CONFIG=/abs/path/quarl.yaml`` (verl merges it into the Ray
runtime env of every actor, and vLLM's workers inherit it). Every worker reads and validates the same file, so
they all hold the same spec; `load_config` logs its digest so the logs show it. The value may also be the YAML text
itself (when the workers do not share a file system). Unknown keys anywhere are errors naming the nearest key
(`quarl.configio`); a plugin loaded without the variable is an error, never a silent no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import yaml

from quarl import configio
from quarl.inject.spec import InjectionSpec
from quarl.noise import AQNConfig

logger = logging.getLogger(__name__)
ENV = "QUARL_VERL_CONFIG"
SEAM = f"+ray_kwargs.ray_init.runtime_env.env_vars.{ENV}=/abs/path/quarl.yaml"
REFERENCES = ("policy", "unquantized")


@dataclasses.dataclass(frozen=True)
class VerlQuarlConfig:
    """The ``quarl:`` block (see the module docstring)."""

    injection: InjectionSpec | None = None
    aqn: AQNConfig | None = None
    total_steps: int | None = None  # AQN schedule length (verl's trainer.total_training_steps); needed with aqn
    reference: str = "policy"  # policy: the reference engine is injected like the actor | unquantized
    cache_weights: bool = True  # actor/reference engines keep e(W) between forwards; false: re-quantize per forward

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise configio.unknown_key_error(str(self.reference), REFERENCES, "quarl.reference")
        if self.injection is not None and not self.injection.use_ste:
            raise ValueError("quarl.injection.use_ste is false: the actor's gradient through every injected "
                             "module would be cut (the W4A4 run stuck at ~8%); verl runs need use_ste: true")
        if self.aqn_enabled and (isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int)
                                 or self.total_steps < 1):
            raise ValueError(f"quarl.aqn is on but quarl.total_steps is {self.total_steps!r}: the AQN schedule needs "
                             "the run length (set it to verl's trainer.total_training_steps)")
        if self.injection is None and not self.aqn_enabled:
            raise ValueError("the quarl block has neither an injection nor AQN: nothing to do (remove "
                             "external_lib=quarl.verl to run verl without quarl)")

    @property
    def aqn_enabled(self) -> bool:
        return self.aqn is not None and self.aqn.enabled

    def digest(self) -> str:
        """Short hash of the resolved block: equal on every worker that holds the same spec."""
        return hashlib.sha256(configio.dump_yaml(self).encode()).hexdigest()[:12]


def parse_config(text: str, where: str = ENV) -> VerlQuarlConfig:
    """Parse YAML text holding exactly one top-level ``quarl:`` block."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or "quarl" not in data:
        keys = list(data) if isinstance(data, dict) else []
        hint = f"; found keys {keys}" if keys else ""
        raise ValueError(f"{where}: expected one top-level 'quarl:' block{hint}")
    extra = [k for k in data if k != "quarl"]
    if extra:
        raise configio.unknown_key_error(extra[0], ["quarl"], f"{where} (top level)")
    return configio.from_dict(VerlQuarlConfig, data["quarl"] or {}, "quarl")


def load_config(environ: dict[str, str] | None = None) -> VerlQuarlConfig:
    """The block named by ``$QUARL_VERL_CONFIG`` (a YAML path, or the YAML text itself).

    Raises:
        RuntimeError: the variable is not set (the message gives the verl override that sets it).
        FileNotFoundError / ValueError: a missing file, or an invalid block.
    """
    value = (os.environ if environ is None else environ).get(ENV)
    if not value:
        raise RuntimeError(f"quarl.verl is loaded (actor_rollout_ref.model.external_lib=quarl.verl) but ${ENV} is not "
                           f"set in this worker; pass the quarl block to every worker with {SEAM}")
    inline = "\n" in value or value.lstrip().startswith(("quarl:", "{"))
    if not inline and not Path(value).is_file():
        raise FileNotFoundError(f"${ENV}={value!r}: no such file on this worker (use an absolute path on a shared "
                                "file system, or put the YAML text itself in the variable)")
    cfg = parse_config(value if inline else Path(value).read_text(), ENV if inline else value)
    logger.info("quarl.verl: config %s (pid %d): injection %s, aqn %s", cfg.digest(), os.getpid(),
                cfg.injection.error_type if cfg.injection else None, "on" if cfg.aqn_enabled else "off")
    return cfg
