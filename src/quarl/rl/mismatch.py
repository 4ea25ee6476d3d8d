"""Rollout-vs-training mismatch, truncated importance sampling (TIS) and rollout health, on TRL's batches.

The rollout samples under phase ``rollout`` (the injection as the inference engine applies it, AQN noise); the loss
scores the same tokens under phase ``training``. Their per-token log-prob difference is the mismatch
(`quarl.rl.health`). The training-phase log-probs come from the cheapest place that has them:

1. the loss forward itself (`LossCapture`: the first ``_get_per_token_logps_and_entropies`` call inside TRL's loss
   is the policy's log-probs; detached, no extra pass) -- when there is no TIS and TRL computed no old log-probs;
2. TRL's ``old_per_token_logps`` when it computed them (``num_iterations > 1``, vLLM);
3. one extra no-grad forward in phase ``training`` (`training_logps`) -- only TIS needs the ratio before the loss,
   to multiply each token's advantage by the detached truncated ratio. TRL's own IS runs on the vLLM path only.

``mismatch/*`` sums are pooled over every rank's tokens and over the micro-batches of a logging window
(`MismatchPool`); ``rollout/*`` health rates over every rank's completions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from quarl.rl.health import mismatch_from_sums, mismatch_sums, pool_sums, rollout_health, tis_weights


def mismatch_from_loss(batch: dict, tis_cap: float | None) -> bool:
    """Whether the loss forward supplies the training-phase log-probs (the one place that decides between it and
    `score_rollouts`): rollout log-probs present, no TIS, no TRL old log-probs."""
    return (batch.get("sampling_per_token_logps") is not None and tis_cap is None
            and batch.get("old_per_token_logps") is None)


class MismatchPool:
    """(5,) mismatch sums pooled over ranks at once and over micro-batches until the next `flush`."""

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None

    def add(self, accelerator: Any, sums: torch.Tensor) -> None:
        gathered = accelerator.gather(sums[None])  # (world, 5)
        if self._acc is not None:
            gathered = torch.cat([gathered, self._acc[None]])
        self._acc = pool_sums(gathered)

    def flush(self, metrics: dict[str, list]) -> None:
        """Append one value per ``mismatch/*`` metric for the window, pooled over its tokens; then start over."""
        if self._acc is None:
            return
        for key, value in mismatch_from_sums(self._acc).items():
            metrics[key].append(value)
        self._acc = None


class LossCapture:
    """What the loss forward leaves behind while `active`: the policy's log-probs (the first call) and, for the
    distillation term, the backbone's last hidden states."""

    def __init__(self) -> None:
        self.logps: list[torch.Tensor] | None = None
        self.hidden: list[torch.Tensor] | None = None

    @contextlib.contextmanager
    def active(self, hidden: bool) -> Iterator[LossCapture]:
        self.logps, self.hidden = [], ([] if hidden else None)
        try:
            yield self
        finally:
            self.logps = self.hidden = None

    def offer_logps(self, logps: torch.Tensor) -> None:
        if self.logps is not None and not self.logps:  # the first call inside the loss is the policy's
            self.logps.append(logps.detach())  # (B, T)

    def offer_hidden(self, hidden: torch.Tensor) -> None:
        if self.hidden is not None:
            self.hidden.append(hidden)  # (B, P+T, H), with grad


def add_from_loss(trainer: Any, captured: list[torch.Tensor], inputs: dict) -> None:
    """Pool the mismatch of the loss forward's log-probs against the rollout's."""
    if not captured:
        raise RuntimeError("the mismatch was to come from the loss forward, but TRL's loss computed no log-probs "
                           "through _get_per_token_logps_and_entropies")
    trainer.mismatch.add(trainer.accelerator, mismatch_sums(captured[0], inputs["sampling_per_token_logps"],
                                                            inputs["completion_mask"], trainer.options.mismatch_cap))


@torch.no_grad()
def training_logps(trainer: Any, out: dict) -> torch.Tensor:
    """Training-phase log-probs of the sampled tokens (the same computation as the loss, without grad)."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)  # (B, P+T)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)  # (B, P+T)
    with trainer.attached.phase("training"):
        logps, *_ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, out["completion_ids"].size(1),
            batch_size=trainer.args.per_device_train_batch_size)
    return logps  # (B, T)


def score_rollouts(trainer: Any, out: dict) -> None:
    """After TRL scored a training batch: mismatch (unless the loss supplies it), TIS on the advantages, rollout
    health and the AQN statistics into TRL's train metrics. ``out`` is changed in place (TIS advantages)."""
    options, metrics = trainer.options, trainer._metrics["train"]
    mask = out["completion_mask"]  # (B, T)
    rollout_lp = out.get("sampling_per_token_logps")  # (B, T) or None
    if rollout_lp is not None and not mismatch_from_loss(out, options.tis_cap):
        train_lp = out.get("old_per_token_logps")  # TRL computed it (num_iterations > 1, vLLM): reuse it
        if train_lp is None:  # TIS needs the ratio before the loss: one extra no-grad forward
            train_lp = training_logps(trainer, out)
        cap = options.tis_cap or options.mismatch_cap
        trainer.mismatch.add(trainer.accelerator, mismatch_sums(train_lp, rollout_lp, mask, cap))
        if options.tis_cap is not None and not trainer.use_vllm:  # with vLLM, TRL's token_truncate IS
            _apply_tis(trainer, out, train_lp, rollout_lp, metrics)
    eos = set(trainer.eos_token_ids)
    rows = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], mask)]
    health = rollout_health(rows, [bool(r) and r[-1] in eos for r in rows])  # this rank's rates
    counts = torch.tensor([[v * len(rows) for v in health.values()] + [len(rows)]], dtype=torch.float64,
                          device=mask.device)
    counts = trainer.accelerator.gather(counts).sum(0)  # (K+1,): every rank's completions
    for i, key in enumerate(health):
        metrics[key].append(float(counts[i] / counts[-1]))
    for key, value in trainer.attached.aqn_stats.items():
        metrics[key].append(float(value))


def _apply_tis(trainer: Any, out: dict, train_lp: torch.Tensor, rollout_lp: torch.Tensor, metrics: dict) -> None:
    mask = out["completion_mask"]
    w = tis_weights(train_lp, rollout_lp, mask, trainer.options.tis_cap)  # (B, T)
    adv = out["advantages"]
    out["advantages"] = (adv.unsqueeze(1) if adv.dim() == 1 else adv) * w  # (B, T)
    n = trainer.accelerator.gather(torch.stack([w[mask.bool()].sum(), mask.sum()]).double()[None]).sum(0)
    metrics["tis/weight_mean"].append(float(n[0] / n[1]) if n[1] > 0 else 1.0)
