"""AQN: selection by class-name pattern, bit-exact restore, per-step resampling, telemetry, loud failure modes."""

import pytest
import torch
from _tiny_models import tiny_llama
from torch import nn

from quarl.noise import AQN, AQNConfig, select_aqn_modules


class RMSNorm(nn.Module):  # vLLM's class name: the fork's isinstance(Qwen2RMSNorm) matched none of these
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.weight


class VllmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"input_layernorm": RMSNorm(8), "qkv_proj": nn.Linear(8, 24)})
                                     for _ in range(2)])


def test_norms_matched_by_class_pattern_in_hf_and_vllm_models():
    hf = [fqn for fqn, _ in select_aqn_modules(tiny_llama(), AQNConfig())]
    assert len(hf) == 2 * 2 + 1 and all(f.endswith("norm") or f.endswith("layernorm") for f in hf)
    assert [f for f, _ in select_aqn_modules(VllmLike(), AQNConfig())] == ["layers.0.input_layernorm",
                                                                         "layers.1.input_layernorm"]


def test_zero_matched_modules_is_an_error_naming_the_classes():
    with pytest.raises(ValueError, match="matches zero modules.*LlamaRMSNorm"):
        AQN(tiny_llama(), AQNConfig(target_classes=("Qwen2RMSNorm",)), total_steps=100)


def test_always_zero_schedule_is_an_error_at_setup():
    with pytest.raises(ValueError, match="sigma is 0 on every step"):
        AQN(tiny_llama(), AQNConfig(), total_steps=1)


def test_noise_applied_then_restored_bit_exactly():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aqn = AQN(model, AQNConfig(schedule="constant", sigma_start=0.05), total_steps=10)
    norm = model.model.layers[0].input_layernorm.weight
    with aqn.noised(3) as stats:
        assert not torch.equal(norm, before["model.layers.0.input_layernorm.weight"])
        assert stats["aqn/modules"] == 5 and stats["aqn/sigma"] == 0.05 and stats["aqn/noise_norm"] > 0
        delta = norm.detach() - before["model.layers.0.input_layernorm.weight"]
        assert 0.02 < float(delta.std()) < 0.09  # N(0, 0.05^2) per channel, 64 channels
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert aqn.applications == 1


def test_noise_is_resampled_per_step_and_reproducible():
    model = tiny_llama()
    aqn = AQN(model, AQNConfig(schedule="constant", sigma_start=0.05, seed=7), total_steps=10)
    w = model.model.norm.weight

    def draw(step):
        with aqn.noised(step):
            return w.detach().clone()

    assert torch.equal(draw(2), draw(2))  # one perturbation per optimizer step (every rollout of it sees the same)
    assert not torch.equal(draw(2), draw(3))
    other = AQN(tiny_llama(), AQNConfig(schedule="constant", sigma_start=0.05, seed=8), total_steps=10)
    with other.noised(2):
        assert not torch.equal(other._modules[-1][1].weight, draw(2))


def test_sigma_zero_touches_nothing_and_reports_zero_modules():
    model = tiny_llama()
    aqn = AQN(model, AQNConfig(), total_steps=100)  # qerl: stage 0 has sigma 0
    with aqn.noised(0) as stats:
        assert stats == {"aqn/sigma": 0.0, "aqn/modules": 0, "aqn/noise_norm": 0.0}
    assert aqn.applications == 0


def test_layer_multipliers_relative_and_linear_targets():
    model = tiny_llama()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = AQNConfig(schedule="constant", sigma_start=0.1, layer_multipliers={1: 0.0})
    with AQN(model, cfg, total_steps=4).noised(0):
        assert torch.equal(model.model.layers[1].input_layernorm.weight, ref["model.layers.1.input_layernorm.weight"])
        assert not torch.equal(model.model.layers[0].input_layernorm.weight,
                               ref["model.layers.0.input_layernorm.weight"])
    lin = AQNConfig(schedule="constant", sigma_start=0.1, target="linear", target_classes=("Linear",), relative=True)
    aqn = AQN(model, lin, total_steps=4)
    assert "lm_head" not in aqn.modules and len(aqn.modules) == 14
    with aqn.noised(0):
        w, w0 = model.model.layers[0].mlp.up_proj.weight, ref["model.layers.0.mlp.up_proj.weight"]
        rel = ((w - w0) / w0).detach()
        assert 0.05 < float(rel.std()) < 0.15  # relative: sigma * |w| * N(0, 1)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, ref["model.layers.0.mlp.up_proj.weight"])


def test_lora_adapters_are_never_noised():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    aqn = AQN(model, AQNConfig(schedule="constant", sigma_start=0.1, target="linear", target_classes=("*Linear",)),
              total_steps=4)
    assert aqn.modules and not any("lora_" in m for m in aqn.modules)
    assert all(m.endswith("base_layer") for m in aqn.modules if "layers" in m)


@pytest.mark.parametrize("bad, match", [
    (dict(schedule="qerll"), "did you mean .qerl."), (dict(target="norms"), "did you mean 'norm'"),
    (dict(apply_during="training"), "aqn.apply_during"), (dict(target_classes=()), "empty"),
    (dict(layer_multipliers={"1": 2.0}), "layer_multipliers"), (dict(sigma_start=-1.0), ">= 0"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        AQNConfig(**bad)
