"""Adaptive quantization noise (AQN, QeRL arXiv 2510.11696): seeded Gaussian noise on RMSNorm gains or linear weights.

What QeRL does (its paper, App. G, and ``trl_trainer``): after each weight sync, add N(0, sigma^2) -- one value per
hidden channel, drawn in fp32 and cast -- in place to every RMSNorm gain of the *rollout* model; training log-probs use
the clean norms. A noisy norm gain is row-wise multiplicative noise on the q/k/v (shared) and gate/up (shared) weights
that follow it.

quarl's version separates when / how much / where:
- when: `AQNConfig.apply_during` (rollout by default, as QeRL); the trainer enters `AQN.noised(step)` around
  generation only, and validation never sees noise unless asked for explicitly;
- how much: sigma = `quarl.noise.sigma_at(step, total_steps, ...)`, a pure function of the optimizer step, times an
  optional per-layer multiplier; absolute (w + sigma*N) or relative (w + sigma*|w|*N);
- where: module selection by class-name pattern (``*RMSNorm*`` matches HF's ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` and
  vLLM's ``RMSNorm``: the fork's ``isinstance(Qwen2RMSNorm)`` matched zero modules in vLLM, silently),
  name regexes and block indices; LoRA adapters are never noised.

Noise is resampled once per optimizer step: the generator of each module is seeded from (seed, step, module name),
so every rollout of one step sees the same perturbation and a resumed run draws the same noise. The clean weights
are restored by ``copy_`` from a snapshot (never by subtracting: rounding makes that inexact), and the restore is
checked bit-for-bit. Zero matched modules is an error at construction, as is a schedule that is 0 on every step.

Mixture-of-experts models. Routers and gates (`quarl.inject.select.is_router`: ``mlp.gate``, ``router``,
``shared_expert_gate``) are never noised, whatever the patterns say: noise on a router reshuffles which experts run,
which no quantized kernel does. Option ``moe_norm: post_attention_layernorm``: in decoder blocks holding routed
experts, noise only that norm (the one feeding the router and the experts; the attention's input norm stays
clean), reported to work better for MoE models in verl-based quantized-RL runs; dense blocks and norms outside the
blocks keep the normal selection.

Sharded weights. The noise of a module is defined on its *full* weight: the generator draws the full-size tensor and
each rank keeps its own shard, so the noise the model sees does not depend on how many ranks hold it.
- FSDP2 / DTensor parameters (``torch.distributed.fsdp.fully_shard``): the full draw is split by the parameter's own
  device mesh and placements (``distribute_tensor(..., src_data_rank=None)``: no communication) and added to the
  local shard; the gathered noised weight is the same at any world size. FSDP2's gathered copies are dropped
  (``reshard()``) on entry and exit, so the forwards inside see the noise and the ones after do not. Cost: one
  transient full-size fp32 draw per noised module per rank (norm gains: a few KB; ``target: linear``: one weight at
  a time).
- vLLM tensor-parallel layers (plain tensors holding one rank's slice; the module's ``tp_size`` / ``tp_rank`` and its
  class name say which dim): ``*ColumnParallelLinear`` slices dim 0, ``RowParallelLinear`` dim 1, from the draw of
  the concatenated shape. RMSNorm gains are replicated under TP, so the default ``target: norm`` needs nothing. For
  fused layers (``QKVParallelLinear``, ``MergedColumnParallelLinear``) the concatenation of rank slices interleaves
  q/k/v (or gate/up) per rank, so their linear-target noise is reproducible at one TP size but differs between sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from quarl import configio
from quarl.inject.errors import module_seed
from quarl.inject.select import block_index, is_experts, is_lora_adapter, is_router
from quarl.noise.schedule import Schedule, check_schedule, sigma_at

logger = logging.getLogger(__name__)
_TARGETS = ("norm", "linear")
_APPLY = ("rollout", "both")


@dataclasses.dataclass(frozen=True)
class AQNConfig:
    """AQN settings (the ``aqn`` block of a train config)."""

    enabled: bool = True  # absent block or enabled: false = off
    schedule: str = "qerl"  # constant | qerl | linear | cosine (quarl.noise.schedule)
    sigma_start: float = 1e-2
    sigma_end: float = 1e-4
    num_stages: int = 10  # qerl's K
    target: str = "norm"  # norm: 1-D gains of modules matching target_classes | linear: 2-D weights
    target_classes: tuple[str, ...] = ("*RMSNorm*",)  # fnmatch on class names (vLLM's RMSNorm too)
    targets: tuple[str, ...] = ()  # regexes on the qualified name; empty = all
    exclude: tuple[str, ...] = (r"(^|\.)lm_head$", r"embed")
    layer_multipliers: dict = dataclasses.field(default_factory=dict)  # {block index: multiplier}; others 1.0
    relative: bool = False  # False: w + sigma*N(0,1) (QeRL); True: w + sigma*|w|*N(0,1)
    apply_during: str = "rollout"  # rollout (QeRL) | both (also the training forwards)
    seed: int = 0
    moe_norm: str | None = None  # e.g. post_attention_layernorm: in blocks with routed experts, noise only this norm

    def __post_init__(self) -> None:
        schedule = self.schedule.value if isinstance(self.schedule, Schedule) else self.schedule
        valid = [s.value for s in Schedule]
        if schedule not in valid:
            raise configio.unknown_key_error(str(schedule), valid, "aqn.schedule")
        object.__setattr__(self, "schedule", schedule)
        for name, allowed in (("target", _TARGETS), ("apply_during", _APPLY)):
            if getattr(self, name) not in allowed:
                raise configio.unknown_key_error(str(getattr(self, name)), allowed, f"aqn.{name}")
        for name in ("target_classes", "targets", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        if not self.target_classes:
            raise ValueError("aqn.target_classes is empty: no module could ever match")
        if self.sigma_start < 0 or self.sigma_end < 0:
            raise ValueError(f"aqn sigmas must be >= 0, got {self.sigma_start}, {self.sigma_end}")
        bad = {k: v for k, v in self.layer_multipliers.items()
               if isinstance(k, bool) or not isinstance(k, int) or not isinstance(v, (int, float)) or v < 0}
        if bad:
            raise ValueError(f"aqn.layer_multipliers maps block index (int) -> multiplier (>= 0); bad: {bad}")
        for pattern in self.targets + self.exclude:
            re.compile(pattern)
        if self.moe_norm is not None and (not isinstance(self.moe_norm, str) or not self.moe_norm):
            raise ValueError(f"aqn.moe_norm must be a module name such as 'post_attention_layernorm', got "
                             f"{self.moe_norm!r}")

    def sigma(self, step: int, total_steps: int) -> float:
        """sigma for ``step`` (before per-layer multipliers)."""
        return sigma_at(step, total_steps, schedule=self.schedule, sigma_start=self.sigma_start,
                        sigma_end=self.sigma_end, num_stages=self.num_stages)


def select_aqn_modules(model: nn.Module, cfg: AQNConfig) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` pairs whose ``weight`` AQN perturbs; raises ValueError listing candidates when none match."""
    targets = [re.compile(p) for p in cfg.targets]
    exclude = [re.compile(p) for p in cfg.exclude]
    want_dim = 1 if cfg.target == "norm" else 2
    chosen = []
    for fqn, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_lora_adapter(fqn) or isinstance(getattr(module, "base_layer", None), nn.Module):
            continue
        if is_router(module, fqn):
            continue
        if not isinstance(weight, torch.Tensor) or weight.dim() != want_dim:
            continue
        if not any(fnmatch.fnmatchcase(type(module).__name__, p) for p in cfg.target_classes):
            continue
        if any(p.search(fqn) for p in exclude) or (targets and not any(p.search(fqn) for p in targets)):
            continue
        chosen.append((fqn, module))
    if cfg.moe_norm is not None:
        chosen = _only_moe_norm(model, chosen, cfg.moe_norm)
    if not chosen:
        classes = sorted({type(m).__name__ for _, m in model.named_modules()})
        raise ValueError(f"AQN is enabled but matches zero modules (target={cfg.target}, target_classes="
                         f"{cfg.target_classes}, targets={cfg.targets}, exclude={cfg.exclude}); module classes in "
                         f"the model: {', '.join(classes)}")
    return chosen


def _only_moe_norm(model: nn.Module, chosen: list[tuple[str, nn.Module]], norm: str) -> list[tuple[str, nn.Module]]:
    """Keep, in decoder blocks that hold routed experts, only the module named ``norm`` (``aqn.moe_norm``).

    Raises:
        ValueError: the model has no routed experts, or an MoE block has no selected ``norm``.
    """
    moe_blocks = {block_index(fqn) for fqn, m in model.named_modules() if is_experts(m)} - {None}
    if not moe_blocks:
        raise ValueError(f"aqn.moe_norm={norm!r} but {type(model).__name__} has no routed experts (an MoE option)")
    kept = [(fqn, m) for fqn, m in chosen
            if block_index(fqn) not in moe_blocks or fqn.split(".")[-1] == norm]
    missing = moe_blocks - {block_index(fqn) for fqn, _ in kept if fqn.split(".")[-1] == norm}
    if missing:
        raise ValueError(f"aqn.moe_norm={norm!r}: no selected module of that name in the MoE blocks "
                         f"{sorted(missing)}")
    logger.info("AQN moe_norm: %d MoE blocks noise only %s", len(moe_blocks), norm)
    return kept


class AQN:
    """AQN attached to one model for a run of ``total_steps`` optimizer steps (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: AQNConfig, total_steps: int, start_step: int = 0) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self._model = model
        self._modules = select_aqn_modules(model, cfg)
        check_schedule(total_steps, schedule=cfg.schedule, sigma_start=cfg.sigma_start, sigma_end=cfg.sigma_end,
                       num_stages=cfg.num_stages, start_step=start_step)
        self.applications = 0  # noised() entries with sigma > 0 (telemetry: proof that it fired)
        self.last: dict[str, Any] = {}
        logger.info("AQN: %d modules (%s), schedule %s %.3g -> %.3g, K=%d, %s", len(self._modules), cfg.target,
                    cfg.schedule, cfg.sigma_start, cfg.sigma_end, cfg.num_stages, cfg.apply_during)

    @property
    def modules(self) -> list[str]:
        """Qualified names of the perturbed modules."""
        return [fqn for fqn, _ in self._modules]

    def sigma(self, step: int) -> float:
        return self.cfg.sigma(step, self.total_steps)

    def _multiplier(self, fqn: str) -> float:
        index = block_index(fqn)
        return float(self.cfg.layer_multipliers.get(index, 1.0)) if index is not None else 1.0

    def _noise(self, fqn: str, module: nn.Module, sigma: float, step: int) -> torch.Tensor:
        """This rank's noise for ``module.weight``: a DTensor for a DTensor weight, else a plain tensor."""
        weight = module.weight
        local = _local(weight.detach())
        full_shape, take = _shard_of(module, weight)
        gen = torch.Generator(device=local.device).manual_seed(module_seed(self.cfg.seed * 1_000_003 + step, fqn))
        z = take(torch.randn(full_shape, generator=gen, device=local.device, dtype=torch.float32))
        if z.shape != local.shape:
            raise RuntimeError(f"AQN: the noise shard of {fqn} has shape {tuple(z.shape)} but the local weight "
                               f"{tuple(local.shape)} (an unsupported sharding layout)")
        scale = sigma * self._multiplier(fqn)
        noise = (z * scale * (local.float().abs() if self.cfg.relative else 1.0)).to(local.dtype)
        if isinstance(weight, DTensor):
            return DTensor.from_local(noise, weight.device_mesh, weight.placements, run_check=False,
                                      shape=weight.shape, stride=weight.stride())
        return noise

    @contextlib.contextmanager
    def noised(self, step: int) -> Iterator[dict[str, Any]]:
        """Perturb the selected weights in place for the block, then restore them bit-exactly.

        Yields the telemetry dict ``{"aqn/sigma", "aqn/modules", "aqn/noise_norm"}`` (also kept as ``self.last``).
        With sigma == 0 nothing is touched and ``aqn/modules`` is 0.
        """
        sigma = self.sigma(step)
        stats = {"aqn/sigma": sigma, "aqn/modules": 0, "aqn/noise_norm": 0.0}
        if sigma == 0.0:
            self.last = stats
            yield stats
            return
        clean = []
        sq = 0.0
        _reshard(self._model)
        with torch.no_grad():
            for fqn, module in self._modules:
                weight = module.weight
                snapshot = weight.detach().clone()
                noise = self._noise(fqn, module, sigma, step)
                weight.add_(noise)
                sq += _square_sum(noise)
                clean.append((weight, snapshot))
        stats.update({"aqn/modules": len(clean), "aqn/noise_norm": sq ** 0.5})
        self.applications += 1
        self.last = stats
        try:
            yield stats
        finally:
            with torch.no_grad():
                for weight, snapshot in clean:
                    weight.copy_(snapshot)  # copy, never subtract: bit-exact, and the Parameter object stays
            _reshard(self._model)
            if self.cfg.target == "norm" and not all(torch.equal(_local(w), _local(s)) for w, s in clean):
                raise RuntimeError("AQN: clean weights were not restored bit-exactly")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's data of ``t`` (the local shard of a DTensor, else ``t``)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _reshard(model: nn.Module) -> None:
    """Drop FSDP2's gathered copies so the next forward gathers the (noised or restored) shards.

    FSDP2 keeps the root module's parameters unsharded after a forward (the backward needs them next); without this,
    noise added to the shards would not reach that forward, and a restore would leave the noised gathered copy in use.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _square_sum(noise: torch.Tensor) -> float:
    """Sum of squares of the full noise tensor (a collective for a DTensor: every rank calls it in the same order)."""
    total = noise.float().pow(2).sum()
    return float(total.full_tensor() if isinstance(total, DTensor) else total)


def _shard_of(module: nn.Module, weight: torch.Tensor):
    """``(full shape, take)``: the shape of the full weight and a function cutting this rank's shard from it."""
    if isinstance(weight, DTensor):
        mesh, placements = weight.device_mesh, weight.placements
        return weight.shape, lambda z: distribute_tensor(z, mesh, placements, src_data_rank=None).to_local()
    tp_size, tp_rank = getattr(module, "tp_size", 1), getattr(module, "tp_rank", 0)
    name = type(module).__name__
    dim = 1 if "RowParallel" in name else 0 if "ColumnParallel" in name or "QKVParallel" in name else None
    if not isinstance(tp_size, int) or tp_size <= 1 or dim is None or dim >= weight.dim():
        return weight.shape, lambda z: z
    shape = list(weight.shape)
    shape[dim] *= tp_size  # vLLM pads nothing here: every rank holds an equal slice

    def take(z: torch.Tensor) -> torch.Tensor:
        return z.narrow(dim, tp_rank * weight.shape[dim], weight.shape[dim])

    return torch.Size(shape), take
