"""verl GSM8K scoring, edge case by edge case; the numeric scorer; the TRL reward agrees with the eval scorer.

Run: python -m pytest tests/eval/test_gsm8k_scoring.py -q
Expected values follow volcengine/verl verl/utils/reward_score/gsm8k.py (the _SOLUTION_CLIP_CHARS = 300 version),
worked by hand from its regexes.
"""

import ast
import inspect
from pathlib import Path

import pytest

from quarl.eval.gsm8k import Scorer, compute_score, extract_answer, gsm8k_reward, is_correct, numeric_equal, score

PAD = "x" * 400  # pushes earlier text out of the last-300-character window

# (text, strict, flexible)
EXTRACT_TABLE = [
    ("so she has 72 left\n#### 72", "72", "72"),
    ("#### 1,234", "1234", "1,234"),  # strict strips commas, flexible keeps them
    ("#### -5", "-5", "-5"),  # negative
    ("#### 3.75", "3.75", "3.75"),  # decimal
    ("#### $18", None, "18"),  # '$' right after '#### ' breaks the strict pattern; flexible finds 18
    ("costs $18\n#### 18", "18", "18"),
    ("the answer is 42.", None, "42."),  # trailing period: no '####'; flexible keeps the period
    ("#### 42.", "42.", "42."),  # ... and so does strict (wrong against "42")
    ("#### 3\nwait, actually\n#### 4", "4", "4"),  # several '####': the last one wins
    ("####72", None, "72"),  # strict needs exactly '#### ' with a space
    ("no digits here", None, None),  # no answer at all
    ("a, b", None, ","),  # verl quirk: a bare comma is a flexible 'number'
    ("a . b .", None, "."),  # all matches are '.', verl returns the first one
    ("#### 7" + PAD, None, None),  # answer beyond the last 300 characters: invisible
    ("#### 7" + PAD + "#### 8", "8", "8"),
    ("#### 7" + "y" * 294, "7", "7"),  # exactly 300 characters: still inside the window
    ("#### 7" + "y" * 295, None, "7"),  # 301 characters: the first '#' is clipped, strict misses, flexible reads 7
]


@pytest.mark.parametrize("text,strict,flexible", EXTRACT_TABLE)
def test_extract_answer_table(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


@pytest.mark.parametrize("text,gt,method,expected", [
    ("#### 72", "72", "strict", 1.0),
    ("#### 72.0", "72", "strict", 0.0),  # exact string match: 72.0 != 72
    ("#### 072", "72", "strict", 0.0),
    ("#### 1,000", "1000", "strict", 1.0),
    ("1,000", "1000", "flexible", 0.0),  # flexible does not strip commas
    ("the answer is 72", "72", "strict", 0.0),  # nothing extracted -> 0
    ("the answer is 72", "72", "flexible", 1.0),
    ("#### 71", "72", "strict", 0.0),
])
def test_compute_score_table(text, gt, method, expected):
    assert compute_score(text, gt, method=method) == expected


def test_format_score_only_when_extracted():
    assert compute_score("#### 71", "72", format_score=0.1) == 0.1  # extracted, wrong
    assert compute_score("seventy-one", "72", format_score=0.1) == 0.0  # nothing extracted: 0, not format_score
    assert compute_score("#### 72", "72", format_score=0.1, score=2.0) == 2.0
    assert score("#### 71", "72", format_score=0.1) == 0.1


def test_compute_score_has_verls_signature_and_return_values():
    empty = inspect.Parameter.empty
    assert [(n, p.default) for n, p in inspect.signature(compute_score).parameters.items()] == [
        ("solution_str", empty), ("ground_truth", empty), ("method", "strict"), ("format_score", 0.0), ("score", 1.0)]
    nothing = compute_score("no answer here", "1")
    assert nothing == 0 and type(nothing) is int  # verl: `return 0`
    right, wrong = object(), object()  # verl returns `score` / `format_score` themselves, unconverted
    assert compute_score("#### 1", "1", score=right, format_score=wrong) is right
    assert compute_score("#### 2", "1", score=right, format_score=wrong) is wrong


@pytest.mark.parametrize("scorer", [Scorer.STRICT, Scorer.FLEXIBLE])
def test_score_is_compute_score_for_verl_scorers(scorer):
    for text, *_ in EXTRACT_TABLE:
        for gt in ("72", "1234", "1,234", "42.", "7", "8", ","):
            ours = score(text, gt, scorer, format_score=0.25, correct_score=2.0)
            assert ours == compute_score(text, gt, scorer.value, format_score=0.25, score=2.0)
            assert type(ours) is float


def test_bad_method_raises():
    with pytest.raises(ValueError):
        extract_answer("#### 1", "loose")


@pytest.mark.parametrize("a,b,equal", [
    ("72", "72.0", True), ("72.00", "72", True), ("1,000", "1000", True), ("-7", "-7.0", True),
    ("72", "72.5", False), (".", "0", False), (",", "0", False), ("1e3", "1000", True), ("NaN", "NaN", False),
    (None, "1", False), ("26.5", "26.50", True),
])
def test_numeric_equal(a, b, equal):
    assert numeric_equal(a, b) is equal


def test_numeric_scorer_is_separate_and_not_default():
    text = "#### 26.5"
    assert not is_correct(text, "26.50")  # default = verl strict
    assert is_correct(text, "26.50", Scorer.NUMERIC)
    assert not is_correct("26.5", "26.50", Scorer.NUMERIC)  # numeric still needs the strict '#### N'
    assert score(text, "26.50", Scorer.NUMERIC) == 1.0
    assert score("#### 26.4", "26.50", Scorer.NUMERIC, format_score=0.25) == 0.25


def test_reward_fn_agrees_with_eval_scorer():
    texts = [row[0] for row in EXTRACT_TABLE] + ["#### 72.0", "#### 1,000", "answer: 1000"]
    truths = ["72", "1234", "-5", "3.75", "18", "18", "42", "42", "4", "72", "0", "0", "0", "7", "8", "7", "7",
              "72", "1000", "1000"]
    for scorer in Scorer:
        rewards = gsm8k_reward(["p"] * len(texts), texts, truths, scorer=scorer)
        assert rewards == [1.0 if is_correct(t, g, scorer) else 0.0 for t, g in zip(texts, truths)]
    assert sum(gsm8k_reward(None, texts, truths)) == 9  # strict: rows 1-4, 6, 9, 15, 16 and '#### 1,000'


def test_reward_fn_conversational_and_length_check():
    msgs = [[{"role": "assistant", "content": "#### 5"}], [{"role": "assistant", "content": "5"}]]
    assert gsm8k_reward(None, msgs, ["5", "5"], scorer="flexible") == [1.0, 1.0]
    with pytest.raises(ValueError):
        gsm8k_reward(None, ["#### 1"], ["1", "2"])


def test_no_eval_of_model_text():
    src = Path(__file__).resolve().parents[2] / "src" / "quarl"
    for path in list((src / "eval").rglob("*.py")) + list((src / "data").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), f"{path}: calls {node.func.id}()"
