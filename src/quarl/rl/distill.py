"""Distillation from the unquantized model next to the GRPO reward (``grpo.distill``): the divergence math.

What: a dense, per-position KL between the full next-token distributions of the policy (the quantized model + LoRA,
phase ``training``, with gradient through the STE) and the unquantized base (no adapters, injection bypassed), on the
policy's own sampled completions -- on-policy distillation (GKD, arXiv 2306.13649; quantization-aware distillation as
in NVIDIA's QAD), added to TRL's loss with weight ``grpo.distill``.

Why: the beta-KL of GRPO (``grpo.reference: unquantized``) sees the teacher only through the log-prob of the one
sampled token (TRL's k3 estimator), a noisy signal that did not help on the testbed (benchmarks/results/grpo_w4a4.md).
The full distribution at every position is the low-variance version of the same signal; TRL's loss forward never
materialises logits (its fused LM head), so the engine rebuilds them from the backbone's hidden states.
"""

from __future__ import annotations

import torch

DIVERGENCES = ("forward", "reverse")  # forward: KL(teacher || policy) (mass-covering); reverse: KL(policy || teacher)


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
