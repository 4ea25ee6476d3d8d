"""Tiny random mixture-of-experts causal LMs built from transformers configs (no download), for inject / rl / checkpoint
tests. Not a test module; tests import it as `_tiny_moe`.

Every width is a multiple of 32, so MXFP4 / NVFP4 blocks tile each expert's input dimension exactly.
"""

import torch
from torch import nn

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral")


def tiny_moe(arch: str = "qwen2_moe", seed: int = 0, num_experts: int = 4, vocab_size: int = 128) -> nn.Module:
    """A 2-layer MoE LM of ``arch`` (Qwen2-MoE with a gated shared expert, Qwen3-MoE, Mixtral, GPT-OSS), top-2 of
    ``num_experts`` experts, random init from ``seed``, eval mode."""
    import transformers as tf

    common = {**COMMON, "vocab_size": vocab_size}
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=num_experts, num_experts_per_tok=2)
        cls = tf.Qwen2MoeForCausalLM
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32, head_dim=16,
                                num_experts=num_experts, num_experts_per_tok=2)
        cls = tf.Qwen3MoeForCausalLM
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=num_experts, num_experts_per_tok=2)
        cls = tf.MixtralForCausalLM
    elif arch == "gpt_oss":  # transposed (E, in, out) experts with biases and interleaved gate/up
        cfg = tf.GptOssConfig(**common, intermediate_size=32, head_dim=16, num_local_experts=num_experts,
                              num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF's init draws experts with a tiny std; spread them so routing and errors are visible
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.normal_(0.0, 0.1)
            elif name.endswith("_proj_bias") and ".experts." in name:
                p.normal_(0.0, 0.1)
            elif name.endswith("gate.weight") or name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    return model


def experts_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every experts container."""
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("Experts")]


def routers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of every router (``*Router`` classes) and Qwen2-MoE's ``shared_expert_gate``."""
    return [(n, m) for n, m in model.named_modules()
            if type(m).__name__.endswith("Router") or n.endswith("shared_expert_gate")]
