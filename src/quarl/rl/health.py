"""Pure per-step diagnostics of a GRPO batch: rollout/training mismatch, truncated importance sampling, rollout health.

Rollout/training mismatch. The sampled tokens' log-probs as the *rollout-phase* model computed them (rollout
injection and AQN on) are compared with the *training-phase* log-probs of the same tokens. Per token, with
``log_ratio = logp_train - logp_rollout`` and ``ratio = exp(log_ratio)`` (= p_train / p_rollout, the importance
weight of an off-policy sample):

    mismatch/kl            k3 estimator of KL(rollout || train): mean(ratio - 1 - log_ratio)  (>= 0, Schulman 2020)
    mismatch/ratio_mean    mean ratio;  mismatch/ratio_max  max ratio
    mismatch/frac_above_cap  fraction of tokens with ratio > cap

Truncated importance sampling (TIS, token level): the advantage of each token is multiplied by the detached
``min(ratio, cap)`` -- classic TIS as verl / TRL's ``token_truncate`` apply it; for w >= 0 this equals multiplying
the per-token PPO loss by w for every loss type (min(c1 A w, c2 A w) = w min(c1 A, c2 A)).

Rollout health. Quantized rollouts are known to produce repetitive garbled tokens (QaRL, arXiv 2604.07853):
a completion is *degenerate* when it hit the length limit without EOS, or when one n-gram (n = 4) of its tokens
occurs at least 3 times and repeated n-grams make up at least half of its n-grams.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch


def mismatch_stats(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                   cap: float) -> dict[str, float]:
    """Mismatch metrics over the masked tokens (see the module docstring).

    Args:
        logp_train: (B, T) training-phase log-probs of the sampled tokens.
        logp_rollout: (B, T) rollout-phase log-probs of the same tokens.
        mask: (B, T) 1 for completion tokens, 0 for padding.
        cap: ratio threshold for ``frac_above_cap``.
    """
    m = mask.bool()  # (B, T)
    if not bool(m.any()):
        return {"mismatch/kl": 0.0, "mismatch/ratio_mean": 1.0, "mismatch/ratio_max": 1.0,
                "mismatch/frac_above_cap": 0.0}
    log_ratio = (logp_train.float() - logp_rollout.float())[m]  # (N,)
    ratio = log_ratio.exp()  # (N,)
    return {
        "mismatch/kl": float((ratio - 1 - log_ratio).mean()),
        "mismatch/ratio_mean": float(ratio.mean()),
        "mismatch/ratio_max": float(ratio.max()),
        "mismatch/frac_above_cap": float((ratio > cap).float().mean()),
    }


def tis_weights(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """(B, T) detached truncated importance weights ``min(p_train / p_rollout, cap)``, 0 on padding."""
    ratio = (logp_train.detach().float() - logp_rollout.detach().float()).exp()  # (B, T)
    return ratio.clamp(max=cap) * mask.float()


def repeats_ngram(tokens: Sequence[int], n: int = 4, min_count: int = 3) -> bool:
    """True when some n-gram occurs ``min_count`` times and repeated n-grams are at least half of all n-grams.

    >>> repeats_ngram([1, 2, 3, 4] * 4), repeats_ngram(list(range(20))), repeats_ngram([5] * 3)
    (True, False, False)
    """
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return False
    counts = Counter(grams)
    if max(counts.values()) < min_count:
        return False
    repeated = sum(c for c in counts.values() if c > 1)
    return repeated * 2 >= len(grams)


def rollout_health(completions: Sequence[Sequence[int]], finished: Sequence[bool]) -> dict[str, float]:
    """``rollout/degenerate_rate``, ``rollout/repeat_rate``, ``rollout/no_eos_rate`` over a batch of completions."""
    if not completions:
        return {}
    repeat = [repeats_ngram(list(c)) for c in completions]
    no_eos = [not f for f in finished]
    degenerate = [r or e for r, e in zip(repeat, no_eos)]
    k = len(completions)
    return {"rollout/degenerate_rate": sum(degenerate) / k, "rollout/repeat_rate": sum(repeat) / k,
            "rollout/no_eos_rate": sum(no_eos) / k}
