"""Diagnose metrics on hand-checkable tensors, and batch building.

Run: python -m pytest tests/diagnose/test_diagnose_metrics.py -q
"""

import math

import pytest
import torch

from quarl.diagnose import build_batch, kl_and_top1, token_nll


def test_kl_zero_for_identical_and_known_value():
    ref = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # p = (1/2, 1/2), (3/4, 1/4)
    quant = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])  # q = (1/2, 1/2) at both positions
    mask = torch.ones(1, 2)
    assert kl_and_top1(ref, ref, mask) == (0.0, 1.0)
    kl, top1 = kl_and_top1(ref, quant, mask)
    # position 2: 3/4 log(3/4 / 1/2) + 1/4 log(1/4 / 1/2) = 0.75 ln 1.5 - 0.25 ln 2 = 0.130812; mean with 0
    assert kl == pytest.approx((0.75 * math.log(1.5) - 0.25 * math.log(2)) / 2, abs=1e-7)  # fp32 log_softmax
    assert top1 == 1.0  # ties resolve to index 0 in both (pos 1: ref and quant tie; pos 2: quant ties, ref says 0)
    assert kl_and_top1(ref, -ref, mask)[1] == 0.5  # flipping pos 2 makes argmax 1 there
    assert kl_and_top1(ref, quant, torch.tensor([[1, 0]]))[0] == 0.0  # masked positions ignored


def test_token_nll_teacher_forced_on_answer_only():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = math.log(3.0)  # p(ids[1] = 2 | t=0) = 3 / (3 + 3) = 1/2
    ids = torch.tensor([[0, 2, 1]])
    answer = torch.tensor([[0, 1, 0]])  # score only position 1 (predicted from t=0)
    assert token_nll(logits, ids, answer) == pytest.approx(math.log(2.0), abs=1e-6)


def test_build_batch_pads_and_marks_answers():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + [len(w) for w in text.split()]

    b = build_batch(tokenizer=Tok(), prompts=["a bb", "ccc"], references=["dddd ee", "f"])
    assert b.input_ids.tolist() == [[1, 1, 2, 4, 2], [1, 3, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert b.answer_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    ids = build_batch(input_ids=torch.tensor([[5, 6, 7]]), max_length=2)
    assert ids.input_ids.tolist() == [[5, 6]] and ids.answer_mask is None
    with pytest.raises(ValueError, match="references"):
        build_batch(tokenizer=Tok(), prompts=["a"], references=["b", "c"])
