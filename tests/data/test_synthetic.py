"""quarl's synthetic word-problem generator: determinism, disjoint splits, correct arithmetic, difficulty knobs.

Run: python -m pytest tests/data/test_synthetic.py -q
"""

import re

import pytest

from quarl.data.records import Problem
from quarl.data.synthetic import ITEMS, NAMES, Split, SyntheticConfig, generate, split_of
from quarl.eval.gsm8k import extract_answer

_LINE = re.compile(r"so \w+ has (\d+) ([-+*/]) (\d+) = (\d+) \w+\.$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}


def _check_solution(p: Problem, cfg: SyntheticConfig) -> list[str]:
    """Recompute every chain-of-thought line; returns the operators used."""
    *lines, final = p.answer.split("\n")
    assert final == f"#### {p.ground_truth}"
    assert len(lines) == p.meta["num_steps"]
    start = int(re.match(r"\w+ has (\d+) ", p.question).group(1))
    value, ops = start, []
    for line in lines:
        a, op, b, c = _LINE.search(line).groups()
        assert int(a) == value, f"step does not continue the chain: {line!r}"
        if op == "/":
            assert int(a) % int(b) == 0, f"inexact division: {line!r}"
        value = _OPS[op](int(a), int(b))
        assert value == int(c) and 0 < value <= cfg.max_value, line
        ops.append(op)
    assert str(value) == p.ground_truth
    return ops


def test_records_are_gsm8k_format_and_arithmetic_is_right():
    cfg = SyntheticConfig()
    problems = generate(cfg, 300, Split.TRAIN, seed=3)
    for p in problems:
        assert isinstance(p, Problem) and p.data_source == "quarl/synthetic"
        assert extract_answer(p.answer, "strict") == p.ground_truth  # verl's scorer reads our ground truth back
        assert cfg.min_steps <= p.meta["num_steps"] <= cfg.max_steps
        _check_solution(p, cfg)
    assert {p.meta["num_steps"] for p in problems} == {1, 2, 3}
    assert {op for p in problems for op in _check_solution(p, cfg)} == {"+", "-", "*", "/"}


def test_same_seed_same_problems_other_seed_other_problems():
    cfg = SyntheticConfig()
    a = generate(cfg, 50, Split.TEST, seed=7)
    assert a == generate(cfg, 50, Split.TEST, seed=7)
    assert [p.question for p in a] != [p.question for p in generate(cfg, 50, Split.TEST, seed=8)]
    # a longer draw extends a shorter one (the stream does not depend on n)
    assert generate(cfg, 80, Split.TEST, seed=7)[:50] == a


def test_held_out_split_never_overlaps_training():
    cfg = SyntheticConfig()
    train = {p.question for seed in (0, 1) for p in generate(cfg, 4000, Split.TRAIN, seed=seed)}
    test = generate(cfg, 500, Split.TEST, seed=1234)
    assert len({p.question for p in test}) == 500  # test problems are unique
    assert not train & {p.question for p in test}
    assert all(split_of(q, cfg.test_fraction) is Split.TRAIN for q in train)
    assert all(p.meta["split"] == "test" for p in test)


def test_split_fraction_matches_config():
    cfg = SyntheticConfig(test_fraction=0.25)
    problems = generate(SyntheticConfig(), 2000, Split.TRAIN, seed=5) + generate(SyntheticConfig(), 200, Split.TEST)
    frac = sum(split_of(p.question, cfg.test_fraction) is Split.TEST for p in problems) / len(problems)
    # ~25% of the hash space; binomial sd at n=2200 is ~0.009, and the 10% test split sits inside the 25% one
    assert 0.25 - 0.05 < frac < 0.25 + 0.1


def test_difficulty_and_vocabulary_knobs():
    cfg = SyntheticConfig(min_steps=4, max_steps=5, ops=("+", "*"), n_names=1, n_items=2, max_value=999)
    problems = generate(cfg, 100, Split.TRAIN, seed=0)
    assert {p.meta["num_steps"] for p in problems} == {4, 5}
    assert {op for p in problems for op in _check_solution(p, cfg)} <= {"+", "*"}
    assert all(p.question.startswith(NAMES[0] + " ") for p in problems)
    assert {p.question.split()[3].rstrip(".") for p in problems} <= set(ITEMS[:2])


@pytest.mark.parametrize("bad", [dict(min_steps=0), dict(min_steps=3, max_steps=2), dict(ops=("^",)), dict(ops=()),
                                 dict(n_names=0), dict(n_items=999), dict(test_fraction=1.0), dict(max_factor=1)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)
