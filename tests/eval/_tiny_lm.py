"""A tiny random Llama and a word-level tokenizer, built in-process for harness tests (no files, no downloads).

Not a test module (no ``test_`` prefix); imported by the tests in this folder. Run them with:
    python -m pytest tests/eval -q
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("<pad> <eos> <bos> <unk> #### . , ? + - * / = has have had buys more how many does Tom Ann apples books "
         "then gives away the answer is let's think step by step and output final after \" ' s").split()
DIGITS = [str(d) for d in range(10)]


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS + digits (digits split one per token); decode joins with spaces."""
    vocab = {w: i for i, w in enumerate(WORDS + DIGITS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """2-layer Llama, hidden 64, fp32, random init from ``seed``; weights scaled up so argmax margins are wide."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # default init std 0.02 gives near-uniform logits and argmax ties
    return model
