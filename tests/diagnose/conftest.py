"""Tiny model + tokenizer for the diagnose tests (built in-process from a config; nothing downloaded).

Run: python -m pytest tests/diagnose -q
"""

import pytest
import torch
from torch import nn

VOCAB = 128


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(cfg).eval()


def char_tokenizer():
    """A byte-free character-level fast tokenizer over printable ASCII (ids < 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1}
    for c in (chr(i) for i in range(32, 127)):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture
def model() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return char_tokenizer()
