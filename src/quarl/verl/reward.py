"""GSM8K reward for verl: ``reward.custom_reward_function.path=pkg://quarl.verl.reward``, ``name=compute_score``.

Returns ``{"score", "acc"}``: verl's reward managers put every extra key of a dict-valued score into
``reward_extra_info``, and its validation reports each as ``val-core/<data_source>/<key>/mean@1``, so
``val-core/openai/gsm8k/acc/mean@1`` appears under any reward manager. Scored by `quarl.eval.gsm8k` (verl's own
strict GSM8K rule, the one ``quarl eval`` uses), so verl's numbers and quarl's are the same numbers.
"""

from __future__ import annotations

from typing import Any

from quarl.eval.gsm8k import Scorer, is_correct, score

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k")


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: Any = None,
                  method: str = "strict", format_score: float = 0.0, **kwargs: Any) -> dict[str, float]:
    """verl's ``custom_reward_function`` signature; ``score`` is the reward, ``acc`` 1.0 / 0.0 correctness.

    >>> compute_score("openai/gsm8k", "so #### 72", "72")
    {'score': 1.0, 'acc': 1.0}
    >>> compute_score("openai/gsm8k", "so 72", "72")
    {'score': 0.0, 'acc': 0.0}

    Raises:
        ValueError: a data source that is not GSM8K (scoring it as GSM8K would be a silent wrong reward).
    """
    if data_source not in GSM8K_SOURCES:
        raise ValueError(f"quarl.verl.reward scores GSM8K only ({', '.join(GSM8K_SOURCES)}), got data_source "
                         f"{data_source!r}")
    scorer = Scorer(method)
    return {"score": float(score(solution_str, str(ground_truth), scorer, format_score=format_score)),
            "acc": float(is_correct(solution_str, str(ground_truth), scorer))}
