"""Batches and logit-damage metrics for `quarl.diagnose` (pure functions of tensors).

Math (``p`` = reference softmax, ``q`` = injected softmax, over the vocabulary, per valid position):

    KL      = mean_t Σ_v p_v (log p_v − log q_v)            (nats; KL(p‖q), the damage seen from the clean model)
    top-1   = mean_t [argmax p == argmax q]
    NLL     = mean over reference-answer tokens of −log softmax(logits[t−1])[ids[t]]   (teacher-forced)

All computed in fp32 from the logits; positions are weighted equally across the batch (padding excluded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with masks."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    answer_mask: torch.Tensor | None  # (B, T) 1 = reference-answer token (None without references)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def build_batch(*, tokenizer: Any = None, prompts: Sequence[str] | None = None,
                input_ids: Sequence[Sequence[int]] | torch.Tensor | None = None,
                references: Sequence[str] | None = None, max_length: int = 512) -> Batch:
    """Tokenize prompts (and optional reference answers, appended) or take token ids; right-pad to one batch.

    Args:
        tokenizer: anything with ``encode(text, add_special_tokens=...)`` (HF tokenizers); needed for prompts.
        prompts: texts; ignored when ``input_ids`` is given.
        input_ids: token id sequences (or a (B, T) tensor) used as they are.
        references: one reference answer per prompt; its tokens are scored by per-token NLL.
        max_length: sequences are truncated to this many tokens (from the right).
    """
    answers: list[list[int]] = []
    if input_ids is not None:
        seqs = [list(map(int, s)) for s in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    else:
        if tokenizer is None or not prompts:
            raise ValueError("diagnose needs token ids, or a tokenizer and prompts")
        seqs = [_encode(tokenizer, p, True) for p in prompts]
        if references is not None:
            if len(references) != len(seqs):
                raise ValueError(f"{len(references)} references for {len(seqs)} prompts")
            answers = [_encode(tokenizer, " " + r.strip(), False) for r in references]
    if not seqs or any(not s for s in seqs):
        raise ValueError("diagnose needs at least one non-empty sequence")
    full = [(s + (answers[i] if answers else []))[:max_length] for i, s in enumerate(seqs)]
    width = max(len(s) for s in full)
    ids = torch.zeros(len(full), width, dtype=torch.long)
    attn = torch.zeros(len(full), width, dtype=torch.long)
    ans = torch.zeros(len(full), width, dtype=torch.long) if answers else None
    for i, s in enumerate(full):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        if ans is not None:
            ans[i, min(len(seqs[i]), len(s)): len(s)] = 1
    return Batch(ids, attn, ans)


def logits_of(model: torch.nn.Module, batch: Batch, **extra: Any) -> torch.Tensor:
    """(B, T, V) logits of a HF-style causal LM (``.logits``), a tuple output, or a plain tensor output."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def kl_and_top1(ref: torch.Tensor, quant: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean KL(p_ref ‖ p_quant) in nats and top-1 agreement over positions where ``mask`` is 1."""
    keep = mask.bool()
    lp = F.log_softmax(ref.float()[keep], dim=-1)  # (N, V)
    lq = F.log_softmax(quant.float()[keep], dim=-1)  # (N, V)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # (N,)
    top1 = (lp.argmax(-1) == lq.argmax(-1)).float()  # (N,)
    return kl.mean().item(), top1.mean().item()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> float:
    """Mean next-token NLL (nats) over the answer tokens (teacher-forced)."""
    logp = F.log_softmax(logits.float()[:, :-1], dim=-1)  # (B, T-1, V) predicts ids[:, 1:]
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    keep = answer_mask[:, 1:].bool()
    return nll[keep].mean().item() if keep.any() else float("nan")


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens (differentiable; used by the gradient-flow check)."""
    keep = batch.attention_mask[:, 1:].bool()
    return F.cross_entropy(logits[:, :-1][keep].float(), batch.input_ids[:, 1:][keep])
