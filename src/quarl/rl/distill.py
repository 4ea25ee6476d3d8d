"""Distillation from the unquantized model next to the GRPO reward (``grpo.distill``): the math and the trainer side.

What: a dense, per-position KL between the full next-token distributions of the policy (the quantized model + LoRA,
phase ``training``, with gradient through the STE) and the unquantized base (no adapters, injection bypassed), on the
policy's own sampled completions -- on-policy distillation (GKD, arXiv 2306.13649; quantization-aware distillation as
in NVIDIA's QAD), added to TRL's loss with weight ``grpo.distill``.

Why: the beta-KL of GRPO (``grpo.reference: unquantized``) sees the teacher only through the log-prob of the one
sampled token (TRL's k3 estimator), a noisy signal that did not raise validation accuracy on the testbed.
The full distribution at every position is the low-variance version of the same signal; TRL's loss forward never
materialises logits (its fused LM head), so `DistillTerm` rebuilds them from the backbone's hidden states.

How (`DistillTerm`): a forward hook on the backbone (``model.base_model``, which TRL's fused LM head runs) keeps the
loss forward's last hidden states; the policy's logits are ``lm_head(hidden) / temperature`` (one extra LM-head
matmul); the teacher's come from one no-grad forward of the base with adapters disabled and the injection bypassed;
``distill * KL`` is added to TRL's loss and ``distill/kl`` logged, pooled over every rank's tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

DIVERGENCES = ("forward", "reverse")  # forward: KL(teacher || policy) (mass-covering); reverse: KL(policy || teacher)
# config attributes with which a model scales its logits beyond lm_head(hidden); the rebuild does not reproduce them
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               divergence: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL between two next-token distributions, masked-mean over the completion tokens.

    Args:
        student_logits: (B, T, V) policy logits (already divided by the sampling temperature); carries the gradient.
        teacher_logits: (B, T, V) teacher logits, same scaling; treated as a constant (detached here).
        mask: (B, T) completion mask (1 = a sampled token, 0 = padding).
        divergence: ``forward`` = sum_v p_t (log p_t - log p_s); ``reverse`` = sum_v p_s (log p_s - log p_t).

    Returns:
        (loss, per_token) -- the scalar masked mean (0 when the mask is empty), and the (B, T) per-token KL, detached.
        Computed in fp32 from log-softmax; exact zero where the two distributions are equal.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != mask.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}, mask {tuple(mask.shape)}")
    log_s = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    log_t = torch.log_softmax(teacher_logits.detach().float(), dim=-1)  # (B, T, V)
    if divergence == "forward":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    else:
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)  # (B, T)
    m = mask.to(per_token.dtype)
    loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    return loss, per_token.detach()


class DistillTerm:
    """The ``grpo.distill`` term of a `QuarlGRPOTrainer` (see the module docstring)."""

    def __init__(self, weight: float, divergence: str) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
        self.weight, self.divergence = weight, divergence

    @staticmethod
    def causal_lm(trainer: Any) -> Any:
        model = trainer.accelerator.unwrap_model(trainer.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def install(self, trainer: Any, sink: Callable[[torch.Tensor], None]) -> None:
        """Hand every backbone forward's last hidden states to ``sink``; refuse models whose logits are scaled."""
        lm = self.causal_lm(trainer)
        text = lm.config.get_text_config()
        scaled = [k for k in _LOGIT_SCALES if getattr(text, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(f"grpo.distill rebuilds logits as lm_head(hidden) / temperature; this model also applies "
                             f"{', '.join(scaled)}, which it does not reproduce")
        lm.base_model.register_forward_hook(lambda module, args, output: sink(output.last_hidden_state))

    @torch.no_grad()
    def teacher_logits(self, trainer: Any, inputs: dict) -> torch.Tensor:
        """(B, T, V) next-token logits of the unquantized base (adapters off, injection bypassed) / temperature."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P+T)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        t = inputs["completion_ids"].size(1)
        model = trainer.accelerator.unwrap_model(trainer.model)
        with trainer.attached.unquantized(), model.disable_adapter():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=t + 1).logits  # (B, T+1, V)
        return logits[:, :-1] / trainer.temperature

    def loss(self, trainer: Any, hidden: list[torch.Tensor], teacher: torch.Tensor, inputs: dict) -> torch.Tensor:
        """``weight * KL`` between the policy's rebuilt logits and ``teacher``; logs ``distill/kl``."""
        if not hidden:
            raise RuntimeError("grpo.distill: the loss forward did not pass through the backbone hook (model."
                               "base_model); this architecture's fused LM head is not supported")
        h = torch.cat(hidden)  # (B, P+T, H)
        t = inputs["completion_ids"].size(1)
        head = self.causal_lm(trainer).get_output_embeddings()
        student = torch.nn.functional.linear(h[:, -t - 1:-1], head.weight, head.bias) / trainer.temperature
        mask = inputs["completion_mask"]
        loss, per_token = distill_kl(student, teacher, mask, self.divergence)
        n = trainer.accelerator.gather(torch.stack([(per_token * mask).sum(), mask.sum()]).double()[None]).sum(0)
        trainer._metrics["train"]["distill/kl"].append(float(n[0] / n[1]) if n[1] > 0 else 0.0)
        return self.weight * loss
