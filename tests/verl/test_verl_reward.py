"""`quarl.verl.reward.compute_score` through verl's own loader (``pkg://``) and reward manager.

Run: nox -s verl   (the pure part also runs without verl)
"""

import importlib.util

import pytest

from quarl.verl.reward import compute_score

_spec = importlib.util.find_spec("verl")
HAS_VERL = _spec is not None and _spec.origin is not None  # tests/verl itself is a namespace package named verl


@pytest.mark.parametrize("text, truth, expected", [
    ("so #### 72", "72", (1.0, 1.0)), ("#### 72.0", "72", (0.0, 0.0)), ("the answer is 72", "72", (0.0, 0.0)),
    ("#### 1,000", "1000", (1.0, 1.0)),
])
def test_score_and_acc_are_verls_strict_gsm8k(text, truth, expected):
    out = compute_score("openai/gsm8k", text, truth)
    assert (out["score"], out["acc"]) == expected


def test_format_score_rewards_an_extractable_wrong_answer_but_not_acc():
    assert compute_score("openai/gsm8k", "#### 7", "72", format_score=0.1) == {"score": 0.1, "acc": 0.0}


def test_other_data_sources_are_refused():
    with pytest.raises(ValueError, match="GSM8K only"):
        compute_score("math", "#### 7", "7")


@pytest.mark.skipif(not HAS_VERL, reason="needs verl (nox -s verl)")
def test_through_verls_loader_and_naive_reward_manager():
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from transformers import PreTrainedTokenizerFast
    from verl import DataProto
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager.naive import NaiveRewardManager

    import quarl

    fn = get_custom_reward_fn(OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://quarl.verl.reward", "name": "compute_score", "reward_kwargs": {}}}}))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(
        __import__("pathlib").Path(quarl.__file__).parent / "assets" / "testbed" / "tokenizer.json"))
    answers = ["so #### 72", "so #### 71", "no answer"]
    resp = [tok.encode(a) for a in answers]
    R = max(map(len, resp))
    prompts = torch.full((3, 2), 5)
    responses = torch.zeros(3, R, dtype=torch.long)
    mask = torch.zeros(3, 2 + R, dtype=torch.long)
    mask[:, :2] = 1
    for i, r in enumerate(resp):
        responses[i, :len(r)] = torch.tensor(r)
        mask[i, 2:2 + len(r)] = 1
    data = DataProto.from_dict(
        tensors={"prompts": prompts, "responses": responses, "attention_mask": mask},
        non_tensors={"data_source": np.array(["openai/gsm8k"] * 3, dtype=object),
                     "reward_model": np.array([{"ground_truth": "72"}] * 3, dtype=object)})
    out = NaiveRewardManager(tokenizer=tok, num_examine=0, compute_score=fn)(data, return_dict=True)
    assert out["reward_extra_info"]["acc"] == [1.0, 0.0, 0.0]
    assert out["reward_tensor"].sum(-1).tolist() == [1.0, 0.0, 0.0]
    assert [tok.decode(r[:len(x)]) for r, x in zip(responses.tolist(), resp)] == answers  # the manager saw these
