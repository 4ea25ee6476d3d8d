"""AQN on MoE models: routers never noised; the ``moe_norm`` option noises only the named norm of MoE blocks.

Run: OMP_NUM_THREADS=1 python -m pytest tests/noise/test_aqn_moe.py -q
"""

import pytest
import torch
from _tiny_models import tiny_llama
from _tiny_moe import routers_of, tiny_moe

from quarl.noise import AQN, AQNConfig, select_aqn_modules


def test_routers_are_never_noised_even_as_linear_targets():
    model = tiny_moe("qwen2_moe")
    names = [f for f, _ in select_aqn_modules(model, AQNConfig(target="linear", target_classes=("*",)))]
    assert "model.layers.0.mlp.shared_expert.up_proj" in names
    assert not {f for f, _ in routers_of(model)} & set(names)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_norm_keeps_only_post_attention_layernorm_in_moe_blocks(arch):
    model = tiny_moe(arch)
    default = [f for f, _ in select_aqn_modules(model, AQNConfig())]
    assert "model.layers.0.input_layernorm" in default
    cfg = AQNConfig(schedule="constant", sigma_start=0.05, moe_norm="post_attention_layernorm")
    aqn = AQN(model, cfg, total_steps=4)
    assert aqn.modules == ["model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm",
                           "model.norm"]  # the final norm sits outside the blocks: normal selection
    clean = {n: p.detach().clone() for n, p in model.named_parameters()}
    with aqn.noised(step=1) as stats:
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, clean[n])}
        assert changed == {f"{m}.weight" for m in aqn.modules} and stats["aqn/modules"] == 3
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())


def test_moe_norm_is_loud_on_a_dense_model_or_a_wrong_name():
    with pytest.raises(ValueError, match="no routed experts"):
        select_aqn_modules(tiny_llama(), AQNConfig(moe_norm="post_attention_layernorm"))
    with pytest.raises(ValueError, match="no selected module of that name"):
        select_aqn_modules(tiny_moe("qwen2_moe"), AQNConfig(moe_norm="ffn_norm"))
    with pytest.raises(ValueError, match="moe_norm"):
        AQNConfig(moe_norm="")
