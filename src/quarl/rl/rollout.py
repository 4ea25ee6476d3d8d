"""The rollout side of a training step: phase ``rollout``, AQN noise, and the sampled tokens' log-probs.

``module.training`` is True during TRL's generation, so it cannot tell rollout from training; the injector is kept in
phase ``training`` and `rollout_context` switches it to ``rollout`` around generation. The same context applies AQN
(rollout only; a training rollout, never evaluation) and, with vLLM, syncs the weights first -- as TRL would -- so the
noise is applied to the synced weights and not overwritten by the sync. With ``aqn.apply_during: both``,
`whole_step_noise` covers the whole step (generation, log-probs, loss, backward) instead; the clean weights are back
before the optimizer step and before validation.

TRL's HF generation path returns no log-probs; `generate_with_logprobs` wraps ``model.generate`` for one call so that
it also returns the processed scores (logits after temperature = the sampling distribution) and gives TRL the sampled
tokens' log-probs, which TRL pads into ``sampling_per_token_logps``. vLLM returns them itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def rollout_context(trainer: Any) -> Iterator[None]:
    """Phase ``rollout``; with vLLM the weight sync of this step; AQN noise on a training rollout."""
    attached = trainer.attached
    with contextlib.ExitStack() as stack:
        stack.enter_context(attached.phase("rollout"))
        if trainer.use_vllm and trainer.state.global_step != trainer._last_loaded_step:
            trainer.vllm_generation.sync_weights()  # the vLLM injector is invalidated by it (`quarl.rl.vllm`)
            trainer._last_loaded_step = trainer.state.global_step  # TRL then skips its own sync
        aqn = attached.vllm_aqn if trainer.use_vllm else attached.aqn
        rollout_only = aqn is not None and (trainer.use_vllm or aqn.cfg.apply_during == "rollout")
        if rollout_only and trainer.model.training:
            attached.aqn_stats = stack.enter_context(aqn.noised(trainer.state.global_step))
        yield


@contextlib.contextmanager
def whole_step_noise(trainer: Any) -> Iterator[None]:
    """``aqn.apply_during: both`` on the HF path: the noise over the whole training step; otherwise nothing."""
    aqn = trainer.attached.aqn
    if aqn is None or trainer.use_vllm or aqn.cfg.apply_during != "both":
        yield
        return
    with aqn.noised(trainer.state.global_step) as stats:
        trainer.attached.aqn_stats = stats
        yield


def generate_with_logprobs(model: Any, generate: Callable[[], tuple]) -> tuple[list[list[int]], list[list[float]]]:
    """Run ``generate()`` (TRL's HF generation of ``model``) with ``model.generate`` recording its scores; returns
    (completion ids, the sampled tokens' log-probs). Exactly one ``generate`` call is expected."""
    scores: list = []
    original = model.generate

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        config = copy.deepcopy(kwargs.pop("generation_config"))
        config.return_dict_in_generate, config.output_scores = True, True
        out = original(*args, **kwargs, generation_config=config)
        scores.append(out.scores)  # tuple of N tensors (B, V): logits after temperature
        return out.sequences

    model.generate = recording  # an instance attribute, deleted below: the class's generate is untouched
    try:
        ids, _ = generate()
    finally:
        del model.generate
    if len(scores) != 1:
        raise RuntimeError(f"TRL's generation called model.generate {len(scores)} times (quarl expects one call)")
    return ids, sampled_logprobs(scores[0], ids)


def sampled_logprobs(scores: tuple, completion_ids: list[list[int]]) -> list[list[float]]:
    """Log-probs of each completion's tokens under the recorded per-step scores (N tensors of (B, V))."""
    logp = torch.log_softmax(torch.stack(scores, dim=1).float(), dim=-1)  # (B, N, V)
    out = []
    for i, ids in enumerate(completion_ids):
        idx = torch.tensor(ids, dtype=torch.long, device=logp.device)  # (n_i,)
        out.append(logp[i, : len(ids)].gather(-1, idx[:, None]).squeeze(-1).tolist())
    return out
