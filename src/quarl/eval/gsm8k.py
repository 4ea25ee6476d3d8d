"""GSM8K answer extraction and scoring, exactly as verl scores it; pure functions, no model, no I/O.

Why this exists: a GSM8K number is only comparable to a published one when the scorer is the same. quarl's
default scorer reproduces ``volcengine/verl: verl/utils/reward_score/gsm8k.py`` (``extract_solution`` and
``compute_score``, the version with ``_SOLUTION_CLIP_CHARS = 300``) character for character in behaviour:

- Only the **last 300 characters** of the completion are searched (verl's speed optimisation; an answer written
  earlier in a long completion is invisible to it, and therefore to us).
- ``strict``: every match of ``#### (-?[0-9.,]+)`` is found and the **last** one wins; ``,`` is removed (and ``$``,
  which the pattern can never capture, so that replace is a no-op kept for fidelity). ``#### 72`` needs exactly one
  space after ``####``; ``####72`` and ``#### $72`` do not match.
- ``flexible``: every match of ``(-?[0-9.,]+)`` is found and the last one that is not ``""`` or ``"."`` wins, with
  NO comma stripping. Quirks kept on purpose: a bare ``,`` in prose is a "number" (``"a, b"`` extracts ``","``),
  ``"1,000"`` stays ``"1,000"`` (never equal to ground truth ``"1000"``), a sentence-final period sticks to the
  number (``"is 42."`` extracts ``"42."``, which is wrong against ``"42"``), and when every match is ``"."`` the loop
  ends on the first match, so ``"."`` is returned.
- ``compute_score``: 0 when nothing is extracted, ``score`` (1.0) on exact *string* equality with the ground truth,
  else ``format_score`` (0.0). So ``72.0`` vs ``72`` is wrong, and so is ``072``. :func:`compute_score` keeps verl's
  signature and return values exactly; :func:`score` is the same rule for any :class:`Scorer`, returning floats.

The strict scorer also measures *format compliance* (a step-0 accuracy of ~8% that was the
same for BF16 measured whether the model wrote ``####``, not quantization damage). The harness therefore reports
strict and flexible accuracy side by side, plus the fraction of completions with an extractable strict answer.

:attr:`Scorer.NUMERIC` is a clearly separate, non-verl option: strict extraction, then numeric comparison with
``decimal.Decimal`` (``72`` == ``72.0`` == ``72.00``). It is never the default; use it to ask "is the model right",
not to reproduce verl numbers. Model text is never ``eval``-ed anywhere.

Training rewards (:func:`gsm8k_reward`) call the same :func:`score` as evaluation (as nanochat's
``tasks/gsm8k.py``: ``reward()`` reuses ``evaluate()``), so training and evaluation can never disagree.

References: verl ``verl/utils/reward_score/gsm8k.py``; ReFT (Trung et al., ACL 2024), which verl cites;
TRL reward-function signature ``f(prompts, completions, **columns) -> list[float]``.
"""

from __future__ import annotations

import decimal
import enum
import re
from collections.abc import Sequence
from typing import Any

# verl: "We only match on the last 300 characters, which is a safe approximation for 300 tokens."
SOLUTION_CLIP_CHARS = 300

_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE_RE = re.compile(r"(\-?[0-9\.\,]+)")
_FLEXIBLE_INVALID = ("", ".")


class Scorer(enum.Enum):
    """How a completion is judged against the ground truth.

    - ``STRICT``: verl strict — last ``#### N`` in the last 300 chars, ``,``/``$`` stripped, exact string match.
      The default, and the one behind ``val-core/openai/gsm8k/acc/mean@1``.
    - ``FLEXIBLE``: verl flexible — last number-like token in the last 300 chars, exact string match.
    - ``NUMERIC``: NOT verl. Strict extraction, then ``Decimal(extracted) == Decimal(ground_truth)``
      (so ``72.0`` matches ``72``); a non-numeric extraction is wrong.
    """

    STRICT = "strict"
    FLEXIBLE = "flexible"
    NUMERIC = "numeric"


def extract_answer(text: str, method: str = "strict") -> str | None:
    """Extract the final answer from a completion exactly as verl's ``extract_solution`` does.

    Args:
        text: the model completion (or a reference solution).
        method: ``"strict"`` (last ``#### N``) or ``"flexible"`` (last number-like token).

    Returns:
        The extracted answer string, or None when nothing matches.

    >>> extract_answer("so 3 + 4 = 7\\n#### 1,234")
    '1234'
    >>> extract_answer("the answer is 42", method="flexible")
    '42'
    >>> extract_answer("the answer is 42.", method="flexible")  # verl keeps the trailing period
    '42.'
    >>> extract_answer("the answer is 42.") is None
    True
    """
    if method not in ("strict", "flexible"):
        raise ValueError(f"method must be 'strict' or 'flexible', got {method!r}")
    if len(text) > SOLUTION_CLIP_CHARS:
        text = text[-SOLUTION_CLIP_CHARS:]
    if method == "strict":
        found = _STRICT_RE.findall(text)
        return found[-1].replace(",", "").replace("$", "") if found else None
    found = _FLEXIBLE_RE.findall(text)
    if not found:
        return None
    for candidate in reversed(found):
        if candidate not in _FLEXIBLE_INVALID:
            return candidate
    return found[0]  # verl's loop variable after exhausting reversed(found): the first match


def compute_score(
    solution_str: str, ground_truth: str, method: str = "strict", format_score: float = 0.0, score: float = 1.0
) -> float:
    """verl's ``compute_score`` for GSM8K, same signature and return values: 0 if nothing extracted, ``score`` if
    equal, else ``format_score``.

    A drop-in for verl's function (e.g. as a verl ``custom_reward_function``): the parameter names and defaults
    are verl's, and the returned objects are the ones verl returns — the int ``0`` when nothing is extracted,
    otherwise ``score`` or ``format_score`` exactly as passed (no float conversion).

    Args:
        solution_str: the model completion.
        ground_truth: the reference final answer (verl ``reward_model.ground_truth``, commas already removed).
        method: ``"strict"`` or ``"flexible"`` (see :func:`extract_answer`).
        format_score: reward for an extractable but wrong answer.
        score: reward for a correct answer.

    Returns:
        The reward.

    >>> compute_score("#### 72", "72"), compute_score("#### 72.0", "72"), compute_score("72", "72")
    (1.0, 0.0, 0)
    """
    answer = extract_answer(solution_str, method=method)
    if answer is None:
        return 0
    return score if answer == ground_truth else format_score


def numeric_equal(a: str | None, b: str | None) -> bool:
    """True when both strings parse as decimal numbers (commas removed) with equal value. Never evaluates text.

    >>> numeric_equal("72.0", "72"), numeric_equal("1,000", "1000"), numeric_equal(".", "0")
    (True, True, False)
    """
    if a is None or b is None:
        return False
    try:
        x, y = decimal.Decimal(a.replace(",", "")), decimal.Decimal(b.replace(",", ""))
    except decimal.InvalidOperation:
        return False
    return x.is_finite() and y.is_finite() and x == y


def is_correct(text: str, ground_truth: str, scorer: Scorer = Scorer.STRICT) -> bool:
    """Whether ``text`` answers ``ground_truth`` under ``scorer`` (verl strict by default).

    >>> is_correct("#### 72.0", "72"), is_correct("#### 72.0", "72", Scorer.NUMERIC)
    (False, True)
    """
    if scorer is Scorer.NUMERIC:
        return numeric_equal(extract_answer(text, "strict"), ground_truth)
    return compute_score(text, ground_truth, method=scorer.value) == 1.0


def score(
    text: str, ground_truth: str, scorer: Scorer = Scorer.STRICT, format_score: float = 0.0, correct_score: float = 1.0
) -> float:
    """Reward for one completion: ``correct_score`` if correct, ``format_score`` if an answer was extracted, else 0.

    quarl's scorer-generic reward, used by evaluation and by :func:`gsm8k_reward` alike. Relation to verl: for
    ``STRICT``/``FLEXIBLE``, ``score(t, g, Scorer(m), format_score=f, correct_score=s)`` equals verl's
    ``compute_score(t, g, method=m, format_score=f, score=s)`` (as a float). ``correct_score`` is verl's ``score``
    argument under another name, because a parameter called ``score`` would shadow this function; where verl's exact
    signature is needed, use :func:`compute_score`, which has it. ``NUMERIC`` follows the same reward rule with
    numeric comparison (not verl).

    Args:
        text: the model completion.
        ground_truth: the reference final answer.
        scorer: how the completion is judged (verl strict by default).
        format_score: reward for an extractable but wrong answer (verl's ``format_score``).
        correct_score: reward for a correct answer (verl's ``score``).

    Returns:
        The reward as a float.

    >>> score("#### 7", "8", format_score=0.1), score("#### 8", "8"), score("8", "8")
    (0.1, 1.0, 0.0)
    """
    scorer = Scorer(scorer)
    if scorer is not Scorer.NUMERIC:
        return float(compute_score(text, ground_truth, scorer.value, format_score=format_score, score=correct_score))
    if extract_answer(text, "strict") is None:
        return 0.0
    return float(correct_score) if is_correct(text, ground_truth, scorer) else float(format_score)


def _completion_text(completion: Any) -> str:
    """TRL passes plain strings, or (conversational) a list of messages whose last one is the assistant's."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a str or a list of chat messages, got {type(completion).__name__}")


def gsm8k_reward(
    prompts: Sequence[Any] | None,
    completions: Sequence[Any],
    ground_truth: Sequence[str],
    scorer: Scorer | str = Scorer.STRICT,
    format_score: float = 0.0,
    **columns: Any,
) -> list[float]:
    """GSM8K reward in TRL's reward-function signature; the same :func:`score` the evaluation uses.

    Args:
        prompts: the prompts (unused; part of TRL's signature).
        completions: one completion per prompt: a string, or a list of chat messages (last one scored).
        ground_truth: the reference final answers (a dataset column of that name).
        scorer: a :class:`Scorer` or its value; verl strict by default.
        format_score: reward for an extractable but wrong answer (verl's default 0.0).
        **columns: other dataset columns TRL passes along (ignored).

    Returns:
        One float reward per completion.

    >>> gsm8k_reward(None, ["x #### 5", "5", [{"role": "assistant", "content": "#### 6"}]], ["5", "5", "6"])
    [1.0, 0.0, 1.0]
    """
    if len(completions) != len(ground_truth):
        raise ValueError(f"{len(completions)} completions but {len(ground_truth)} ground truths")
    scorer = Scorer(scorer)
    return [
        score(_completion_text(c), str(g), scorer, format_score=format_score) for c, g in zip(completions, ground_truth)
    ]
