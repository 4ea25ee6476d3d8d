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


def mismatch_sums(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                  cap: float) -> torch.Tensor:
    """(5,) float64 sufficient statistics of the mismatch over the masked tokens, poolable across micro-batches and
    ranks (add everything but entry 2, which pools by max): [sum k3, sum ratio, max ratio, tokens above cap, tokens].

    Args:
        logp_train: (B, T) training-phase log-probs of the sampled tokens.
        logp_rollout: (B, T) rollout-phase log-probs of the same tokens.
        mask: (B, T) 1 for completion tokens, 0 for padding.
        cap: ratio threshold for ``frac_above_cap``.
    """
    m = mask.bool()  # (B, T)
    log_ratio = (logp_train.detach().double() - logp_rollout.detach().double())[m]  # (N,)
    ratio = log_ratio.exp()  # (N,)
    if ratio.numel() == 0:
        return torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64, device=mask.device)
    return torch.stack([(ratio - 1 - log_ratio).sum(), ratio.sum(), ratio.max(), (ratio > cap).sum().double(),
                        torch.tensor(float(ratio.numel()), dtype=torch.float64, device=ratio.device)])


def pool_sums(sums: torch.Tensor) -> torch.Tensor:
    """(K, 5) -> (5,): pool :func:`mismatch_sums` rows (micro-batches, ranks)."""
    out = sums.sum(0)
    out[2] = sums[:, 2].max()
    return out


def mismatch_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """The ``mismatch/*`` metrics of pooled :func:`mismatch_sums` (no tokens: no mismatch)."""
    k3, ratio, ratio_max, above, n = (float(x) for x in sums)
    if n == 0:
        return {"mismatch/kl": 0.0, "mismatch/ratio_mean": 1.0, "mismatch/ratio_max": 1.0,
                "mismatch/frac_above_cap": 0.0}
    return {"mismatch/kl": k3 / n, "mismatch/ratio_mean": ratio / n, "mismatch/ratio_max": ratio_max,
            "mismatch/frac_above_cap": above / n}


def mismatch_stats(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                   cap: float) -> dict[str, float]:
    """Mismatch metrics over the masked tokens of one batch (see the module docstring and :func:`mismatch_sums`)."""
    return mismatch_from_sums(mismatch_sums(logp_train, logp_rollout, mask, cap))


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
