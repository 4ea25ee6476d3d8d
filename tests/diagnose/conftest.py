"""Tiny model + tokenizer for the diagnose tests (built in-process from a config; nothing downloaded).

Run: python -m pytest tests/diagnose -q
"""

import pytest
from torch import nn

from _tiny_models import tiny_llama


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
