"""Precision plans (``InjectionSpec.plan``): rules and presets applied as declared, shown by telemetry, strict config.

Run: python -m pytest tests/inject/test_inject_plan.py -q
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quarl.inject import InjectionSpec, attach, select_modules
from quarl.inject.plan import PRESETS, PlanRule, PrecisionPlan
from quarl.inject.spec import DEFAULT_EXCLUDE


def _llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model, *specs):
    injectors = [attach(model, s) for s in specs]
    try:
        with torch.no_grad():
            return model(_ids()).logits
    finally:
        for inj in injectors:
            inj.detach()


def test_first_and_last_layers_in_full_precision():
    model = _llama()
    spec = InjectionSpec(scheme="W4A4", plan={"rules": [{"first": 1, "last": 1, "format": "none"}]})
    with attach(model, spec) as inj:
        assert sorted({m.split(".")[2] for m in inj.modules}) == ["1", "2"]
        formats = inj.formats()
        stats = inj.stats()
    assert formats["model.layers.0.self_attn.q_proj"].startswith("none (plan rule 0: first 1, last 1 -> none)")
    assert formats["model.layers.3.mlp.down_proj"].startswith("none (plan rule 0")
    assert formats["model.layers.1.mlp.down_proj"] == "mxfp4" == stats["model.layers.1.mlp.down_proj"]["format"]
    assert "model.layers.0.self_attn.q_proj" not in stats  # no hook: its forward is the plain one
    # the same computation as a spec that never selected blocks 0 and 3
    assert torch.equal(_logits(model, spec), _logits(model, InjectionSpec(scheme="W4A4", target_layers=(1, 2))))


def test_negative_layers_count_from_the_end():
    model = _llama()
    a = InjectionSpec(scheme="W4A4", plan={"rules": [{"layers": [0, -1]}]})
    b = InjectionSpec(scheme="W4A4", plan={"rules": [{"first": 1, "last": 1}]})
    with attach(model, a) as ia, attach(_llama(), b) as ib:
        assert ia.modules == ib.modules


def test_another_format_for_one_kind_equals_two_separate_injections():
    model = _llama()
    spec = InjectionSpec(scheme="NVFP4", plan={"rules": [{"kinds": ["down_proj"], "format": "fp8_e4m3"}]})
    with attach(model, spec) as inj:
        stats = inj.stats()
        assert inj.modules == [n for n, _ in select_modules(model, spec)]  # the model's order, not the formats'
    assert stats["model.layers.2.mlp.down_proj"]["format"] == "fp8_e4m3"
    assert stats["model.layers.2.mlp.up_proj"]["format"] == "nvfp4"
    body = InjectionSpec(scheme="NVFP4", exclude=DEFAULT_EXCLUDE + (r"down_proj",))
    down = InjectionSpec(scheme="FP8", targets=(r"down_proj",))
    assert torch.equal(_logits(model, spec), _logits(model, body, down))


def test_later_rules_override_earlier_ones():
    model = _llama()
    spec = InjectionSpec(scheme="W4A4", plan={"rules": [{"kinds": ["mlp"], "format": "none"},
                                                         {"kinds": ["down_proj"], "layers": [1], "format": "nvfp4"}]})
    with attach(model, spec) as inj:
        mlp = [m for m in inj.modules if ".mlp." in m]
        assert mlp == ["model.layers.1.mlp.down_proj"]
        assert inj.stats()[mlp[0]]["format"] == "nvfp4"


def test_preset_verl_nvfp4_qat_keeps_head_and_embeddings():
    model = _llama()
    spec = InjectionSpec(scheme="NVFP4", quantize_lm_head=True, plan="verl-nvfp4-qat")
    with attach(model, spec) as inj:
        assert "lm_head" not in inj.modules  # the preset wins over quantize_lm_head
        formats = inj.formats()
        assert len(inj.modules) == 4 * 7
    assert formats["lm_head"].startswith("none (plan rule 0")
    assert formats["model.embed_tokens"].startswith("none (plan rule 0") and "not injected" in formats[
        "model.embed_tokens"]


def test_preset_verl_w4a4_moe_keeps_attention_and_boundary_mlps():
    model = _llama(layers=8)
    with attach(model, InjectionSpec(scheme="W4A4", plan="verl-w4a4-moe")) as inj:
        assert inj.modules == [f"model.layers.{i}.mlp.{p}" for i in (2, 3) for p in ("gate_proj", "up_proj",
                                                                                     "down_proj")]
    assert set(PRESETS) == {"verl-nvfp4-qat", "verl-w4a4-moe"}


@pytest.mark.parametrize("rules,match", [
    ([{"modules": ["nonexistent"]}], "matches no module"),
    ([{"layers": [7]}], "matches no module"),
    ([{"kinds": ["router"]}], "matches no module"),  # a dense model has no router
    ([{"kinds": ["embeddings"], "format": "fp8_e4m3"}], "does not inject"),
    ([{"first": 4}], "nothing would be quantized"),
])
def test_a_rule_that_does_nothing_raises(rules, match):
    with pytest.raises(ValueError, match=match):
        attach(_llama(), InjectionSpec(scheme="W4A4", plan={"rules": rules}))


def test_rule_format_checked_against_the_spec():
    # a per-token input scale exists for NVFP4 / FP8, not MX: the rule's format is validated with the spec's fields
    spec = InjectionSpec(scheme="NVFP4", input_scale="per_token", plan={"rules": [{"layers": [0], "format": "mxfp4"}]})
    with pytest.raises(ValueError, match="plan rule 0"):
        attach(_llama(), spec)


def test_strict_config():
    with pytest.raises(ValueError, match="rules"):
        InjectionSpec(scheme="W4A4", plan={"rule": [{"first": 1}]})
    with pytest.raises(ValueError, match="kinds"):
        InjectionSpec(scheme="W4A4", plan={"rules": [{"kind": ["mlp"]}]})
    with pytest.raises(ValueError, match="attention"):
        PlanRule(kinds=("attn",))
    with pytest.raises(ValueError, match="verl-nvfp4-qat"):
        PrecisionPlan(preset="verl-nvfp4")
    with pytest.raises(ValueError, match="fp8_e4m3"):
        PlanRule(first=1, format="fp8_e4m2")
    with pytest.raises(ValueError, match="at least one"):
        PlanRule(format="none")
    with pytest.raises(ValueError, match="injects none"):
        InjectionSpec(kv_cache="fp8_e4m3", plan="verl-nvfp4-qat")
    spec = InjectionSpec(scheme="W4A4", plan={"preset": "verl-nvfp4-qat", "rules": [{"layers": [0, -1]}]})
    assert InjectionSpec.from_yaml(spec.to_yaml()) == spec


def test_moe_routers_and_experts():
    from _tiny_moe import routers_of, tiny_moe

    model = tiny_moe("qwen2_moe")
    with attach(model, InjectionSpec(scheme="NVFP4", plan="verl-nvfp4-qat")) as inj:
        formats = inj.formats()
        experts = [m for m in inj.modules if m.endswith("experts")]
    routers = [n for n, _ in routers_of(model)]
    assert routers and all(formats[r].startswith("none (plan rule 0") for r in routers)
    assert experts and all(formats[e] == "nvfp4" for e in experts)
    # experts take another format like any module; the routers stay out whatever the rule says
    spec = InjectionSpec(scheme="NVFP4", plan={"rules": [{"modules": [r"experts$"], "format": "mxfp4"}]})
    with attach(model, spec) as inj:
        assert all(inj.stats()[e]["format"] == "mxfp4" for e in experts)


def test_static_input_scales_are_bound_per_format():
    model = _llama(layers=2)
    names = [n for n, _ in select_modules(model, InjectionSpec(scheme="NVFP4"))]
    spec = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax={n: 4.0 for n in names},
                         plan={"rules": [{"kinds": ["down_proj"], "format": "fp8_e4m3"}]})
    with attach(model, spec) as inj:
        scales = inj.input_scales()
        formats = inj.formats()
    assert all(scales[n] == "static (calibrated amax 4)" for n in names)
    assert formats["model.layers.0.mlp.down_proj"] == "fp8_e4m3" and formats["model.layers.0.mlp.up_proj"] == "nvfp4"


def test_a_plan_for_the_plain_model_applies_to_the_lora_wrapped_one():
    from peft import LoraConfig, get_peft_model

    lora_wrap = lambda m: get_peft_model(m, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # noqa: E731
    rules = [{"modules": [r"^model\.layers\.0\.self_attn\.q_proj$"], "format": "none"}]
    spec = InjectionSpec(scheme="NVFP4", plan={"rules": rules})
    names = [n for n, _ in select_modules(_llama(), InjectionSpec(scheme="NVFP4"))]
    with attach(_llama(), spec) as plain, attach(lora_wrap(_llama()), spec) as wrapped:
        assert len(wrapped.modules) == len(plain.modules) == len(names) - 1
        kept = "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
        assert kept not in wrapped.modules and wrapped.formats()[kept].startswith("none (plan rule 0")
