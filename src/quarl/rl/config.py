"""The `quarl train` configuration: frozen dataclasses, strict YAML, ``--set key.sub=value`` overrides.

Blocks (each its own frozen dataclass; YAML nests at most two levels):

    model      which model (anything `quarl.models.load_model` accepts)
    data       training prompts and the held-out validation set
    injection  an `InjectionSpec` (absent / null = unquantized)
    aqn        an `AQNConfig` (absent / null or ``enabled: false`` = off)
    lora       PEFT LoRA on the frozen base
    grpo       the GRPO / DAPO algorithm (mapped onto TRL's GRPOConfig by `quarl.rl.run`)
    eval       validation: every N steps (and always at step 0 and the final step), how many problems
    run        seed, name, checkpointing

Unknown keys anywhere -- in the file or through ``--set`` -- are errors naming the nearest valid key
(`quarl.configio`): a silently dropped key (a misspelt per-layer sigma, say) would run a different experiment than
the one written down.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from quarl import configio
from quarl.inject.spec import InjectionSpec
from quarl.noise import AQNConfig

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ModelBlock:
    name: str = "testbed:tiny"  # testbed:tiny | smollm2 | HF id | local dir | file.gguf
    dtype: str | None = None  # None = the checkpoint's dtype (fp32 for the testbed)


@dataclasses.dataclass(frozen=True)
class DataBlock:
    source: str = "synthetic"  # quarl.data.load_source name for training prompts (split "train")
    train_n: int = 8192  # training prompts (cycled if the run needs more)
    val_source: str | None = None  # validation source (split "test"); None = same as source
    seed: int | None = None  # data sampling seed (None = run.seed)


@dataclasses.dataclass(frozen=True)
class LoRABlock:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)  # PEFT names; all-linear = every linear projection, not lm_head
    trainable_norms: bool = False  # also train the RMSNorm gains (modules_to_save-free: requires_grad on the base)
    norms_lr: float | None = None  # lr of the trainable norm gains (None = grpo.lr; Adam moves a gain ~lr per step)


@dataclasses.dataclass(frozen=True)
class GRPOBlock:
    loss_type: str = "dapo"  # grpo | dapo | dr_grpo | bnpo (TRL's implementations)
    beta: float = 0.0  # KL coefficient (0 = no reference model)
    reference: str = "injected"  # KL reference = the base without adapters: injected (TRL's) | unquantized (teacher)
    epsilon: float = 0.2  # PPO clip (lower)
    epsilon_high: float | None = None  # clip-higher (DAPO); None = epsilon
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 160  # completion length limit (the testbed's longest chains need ~120)
    prompts_per_step: int = 16
    generations: int = 8  # completions per prompt (the GRPO group)
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | constant_with_warmup | linear | cosine (set explicitly: HF's default decays)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 100  # optimizer steps (one update per generation batch)
    scale_rewards: str = "group"  # group | batch | none (TRL)
    scorer: str = "strict"  # reward scorer: verl strict (default) | flexible -- the same function validation uses
    format_score: float = 0.0  # verl's reward for an extractable but wrong answer
    format_reward: float = 0.0  # weight of an extra reward 1.0 for any extractable '#### N' (0 = off)
    distill: float = 0.0  # weight of a full-distribution KL to the unquantized base on the policy's completions (0 = off)
    distill_divergence: str = "forward"  # forward = KL(unquantized || policy) | reverse = KL(policy || unquantized)
    tis_cap: float | None = None  # truncated importance sampling cap on rollout/training token ratios (None = off)
    mismatch_cap: float = 2.0  # ratio threshold reported as mismatch/frac_above_cap when TIS is off
    gradient_checkpointing: bool = False  # off: the testbed fits easily, and recompute doubles hook work
    use_vllm: bool = False  # TRL's vLLM generation (GPU); the injection is attached to vLLM's model too


@dataclasses.dataclass(frozen=True)
class EvalBlock:
    every: int = 25  # validate every N optimizer steps (and always at step 0 and the final step)
    n: int = 500  # held-out problems
    batch_size: int = 128
    max_new_tokens: int | None = None  # None = grpo.max_new_tokens
    aqn: bool = False  # AQN during validation: OFF unless asked for explicitly


@dataclasses.dataclass(frozen=True)
class RunBlock:
    seed: int = 0
    name: str | None = None  # human name (e.g. E13g), part of the run id
    checkpoint_every: int = 25  # optimizer steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 2  # newest checkpoints kept (>= 2: rotation runs before the completion marker)
    threads: int | None = None  # torch.set_num_threads (None = leave as is)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelBlock = ModelBlock()
    data: DataBlock = DataBlock()
    injection: InjectionSpec | None = None
    aqn: AQNConfig | None = None
    lora: LoRABlock = LoRABlock()
    grpo: GRPOBlock = GRPOBlock()
    eval: EvalBlock = EvalBlock()
    run: RunBlock = RunBlock()

    def __post_init__(self) -> None:
        g = self.grpo
        _one_of("grpo.loss_type", g.loss_type, LOSS_TYPES)
        _one_of("grpo.lr_schedule", g.lr_schedule, LR_SCHEDULES)
        _one_of("grpo.scale_rewards", g.scale_rewards, ("group", "batch", "none"))
        _one_of("grpo.scorer", g.scorer, ("strict", "flexible"))
        positive = {"grpo.steps": g.steps, "grpo.prompts_per_step": g.prompts_per_step,
                    "grpo.max_new_tokens": g.max_new_tokens, "eval.every": self.eval.every, "eval.n": self.eval.n,
                    "lora.r": self.lora.r, "data.train_n": self.data.train_n}
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if g.generations < 2:
            raise ValueError(f"grpo.generations must be >= 2 (a group of one has no advantage), got {g.generations}")
        if not g.lr > 0 or g.temperature <= 0:
            raise ValueError(f"grpo.lr and grpo.temperature must be > 0, got {g.lr}, {g.temperature}")
        _one_of("grpo.reference", g.reference, ("injected", "unquantized"))
        if g.reference == "unquantized" and not (g.beta > 0 and self.injection is not None):
            raise ValueError("grpo.reference=unquantized (KL to the base without injection) needs grpo.beta > 0 and an "
                             f"injection block; got beta {g.beta}, injection {'set' if self.injection else 'absent'}")
        if self.lora.norms_lr is not None and not (self.lora.trainable_norms and self.lora.norms_lr > 0):
            raise ValueError(f"lora.norms_lr must be > 0 and needs lora.trainable_norms: true, got "
                             f"{self.lora.norms_lr} (trainable_norms {self.lora.trainable_norms})")
        _one_of("grpo.distill_divergence", g.distill_divergence, ("forward", "reverse"))
        if not g.distill >= 0 or (g.distill > 0 and self.injection is None):
            raise ValueError(f"grpo.distill must be >= 0 and needs an injection block (it distils the unquantized base "
                             f"into the quantized policy); got {g.distill}, injection "
                             f"{'set' if self.injection else 'absent'}")
        unquantized = [k for k, on in (("grpo.reference=unquantized", g.reference == "unquantized"),
                                        ("grpo.distill", g.distill > 0)) if on]
        if unquantized and self.aqn_enabled and self.aqn.apply_during == "both":
            raise ValueError(f"{unquantized[0]} with aqn.apply_during=both: the unquantized forward would carry the "
                             "AQN noise of the training step, so it would not be the full-precision base; use "
                             "aqn.apply_during=rollout")
        if g.tis_cap is not None and not g.tis_cap >= 1:
            raise ValueError(f"grpo.tis_cap must be >= 1 (a cap on p_train/p_rollout), got {g.tis_cap}")
        if self.run.keep_checkpoints < 2:
            raise ValueError("run.keep_checkpoints must be >= 2 (TRL rotates before quarl marks a checkpoint done)")
        if self.run.checkpoint_every < 0:
            raise ValueError(f"run.checkpoint_every must be >= 0, got {self.run.checkpoint_every}")

    @property
    def aqn_enabled(self) -> bool:
        return self.aqn is not None and self.aqn.enabled

    def validation(self) -> Any:
        """The `quarl.eval.harness.EvalConfig` of this run's validation: greedy, ``eval.max_new_tokens`` (default
        ``grpo.max_new_tokens``), ``eval.batch_size``, scored like the reward (``grpo.scorer``, ``format_score``).
        The trainer's validator and ``quarl demo``'s unquantized baseline both use it, so they score alike."""
        from quarl.eval.harness import EvalConfig, GenerationConfig

        gen = GenerationConfig(max_new_tokens=self.eval.max_new_tokens or self.grpo.max_new_tokens,
                               batch_size=self.eval.batch_size)
        return EvalConfig(generation=gen, scorer=self.grpo.scorer, format_score=self.grpo.format_score)

    def to_dict(self) -> dict[str, Any]:
        return configio.to_dict(self)

    def to_yaml(self, path: str | Path | None = None, header: str | None = None) -> str:
        return configio.dump_yaml(self, path, header)


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise configio.unknown_key_error(str(value), valid, name)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b] = value`` for ``a.b``; intermediate blocks are created (a null block becomes a mapping)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a block")
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of the raw config dict with ``key.sub=value`` overrides applied (values parsed as YAML scalars)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key.sub=value, got {item!r}")
        key, raw = item.split("=", 1)
        if not key:
            raise ValueError(f"--set expects key.sub=value, got {item!r}")
        _set_path(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def load_config(source: str | Path | dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Build a `TrainConfig` from a YAML path, a YAML string, a dict, or None (defaults), then ``--set`` overrides.

    Raises:
        ValueError: an unknown key (naming the nearest valid one), a bad value, or a malformed override.
    """
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        text = path.read_text() if ("\n" not in str(source) and path.exists()) else str(source)
        if "\n" not in str(source) and not path.exists() and str(source).endswith((".yaml", ".yml")):
            raise FileNotFoundError(f"config file not found: {source}")
        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"a train config is a mapping of blocks, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides))
    return configio.from_dict(TrainConfig, data, "train config")
