"""Tiny HF causal LMs built from a config in-process (no download), shared by the inject and diagnose tests.

Not a test module; `tests/` is on sys.path through pytest's rootdir conftest, so tests import it as `_tiny_models`.
"""

import torch
from torch import nn

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def tiny_llama(seed: int = 0) -> nn.Module:
    """2-layer Llama (hidden 64, vocab 128), random init from ``seed``, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    """The same shape as a Qwen2 model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
