"""reasoning-gym gsm_symbolic loader: deterministic, disjoint held-out split, references score correct.

Run: python -m pytest tests/data/test_reasoning_gym.py -q
"""

import pytest

from quarl.data.reasoning_gym import load_gsm_symbolic, split_of
from quarl.eval.gsm8k import is_correct


def test_deterministic_and_prefix_stable():
    a = load_gsm_symbolic(20, split="test", seed=3)
    assert a == load_gsm_symbolic(20, split="test", seed=3)
    assert load_gsm_symbolic(8, split="test", seed=3) == a[:8]  # asking for fewer gives a prefix
    assert load_gsm_symbolic(8, split="test", seed=4) != a[:8]


def test_train_and_test_never_overlap():
    test = load_gsm_symbolic(60, split="test", seed=0)
    train = load_gsm_symbolic(1500, split="train", seed=0)
    other_seed_train = load_gsm_symbolic(500, split="train", seed=1)
    test_q = {p.question for p in test}
    assert len(test_q) == 60
    assert not test_q & {p.question for p in train + other_seed_train}
    assert all(split_of(p.question) == "test" for p in test)
    assert all(split_of(p.question) == "train" for p in train)


def test_records_are_gsm8k_format():
    for p in load_gsm_symbolic(40, split="test", seed=0):
        assert p.answer.rstrip().endswith(f"#### {p.ground_truth}")
        assert is_correct(p.answer, p.ground_truth), p.id  # the reference solution scores 1 under verl strict
        assert not p.question.endswith("Do not include units.")
        assert p.data_source == "reasoning_gym/gsm_symbolic" and p.meta["split"] == "test"


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_gsm_symbolic(1, split="validation")
    with pytest.raises(ValueError):
        load_gsm_symbolic(1, test_fraction=1.0)
