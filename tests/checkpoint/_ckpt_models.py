"""The tiny Llama the checkpoint tests export: hidden 128 / intermediate 256, so every scheme's block or group
(16, 32, 128) divides every linear layer (not a test module)."""

import torch

from _tiny_models import TINY


def ckpt_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 256})).eval()
