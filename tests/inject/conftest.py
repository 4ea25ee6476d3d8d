"""Tiny models shared by the inject tests: HF Llama / Qwen2 built from a config (no download), a PEFT LoRA wrap.

Run: python -m pytest tests/inject -q
"""

import pytest
import torch
from torch import nn

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def tiny_qwen2(seed: int = 0) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()


def lora_wrap(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0,
                     init_lora_weights=False)  # non-zero B so adapter gradients reach A as well
    return get_peft_model(model, cfg)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def qwen2() -> nn.Module:
    return tiny_qwen2()


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def lora_llama() -> nn.Module:
    return lora_wrap(tiny_llama())
