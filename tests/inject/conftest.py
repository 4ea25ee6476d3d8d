"""Tiny models shared by the inject tests: HF Llama / Qwen2 built from a config (no download), a PEFT LoRA wrap.

Run: python -m pytest tests/inject -q
"""

import pytest
import torch
from torch import nn

from _tiny_models import TINY, tiny_llama, tiny_qwen2


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
