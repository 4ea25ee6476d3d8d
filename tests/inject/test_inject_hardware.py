"""Hardware presets: `InjectionSpec(hardware=...)` expands into explicit fields (shown by to_dict / YAML), conflicting
explicit fields raise, and the presets attach to dense and MoE models (per-token FP8 inputs on every expert).

Run: OMP_NUM_THREADS=1 python -m pytest tests/inject/test_inject_hardware.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import tiny_llama
from _tiny_moe import experts_of, tiny_moe

from quarl.formats import fake_quantize, get_format
from quarl.inject import InjectionSpec, attach
from quarl.inject.hardware import HARDWARE

FP8_KV = {"format": "fp8_e4m3", "scale": "tensor", "calibration": "unit", "options": {}}
EXPECTED = {
    "nvidia-b200-nvfp4": {"error_type": "nvfp4", "injection_point": "both", "input_scale": "static",
                          "kv_cache": FP8_KV, "attention": None, "format_options": {}},
    "amd-mi355-mxfp4": {"error_type": "mxfp4", "injection_point": "both", "input_scale": "dynamic",
                        "kv_cache": FP8_KV, "attention": None, "format_options": {"profile": "ocp"}},
    "nvidia-h100-fp8": {"error_type": "fp8_e4m3", "injection_point": "both", "input_scale": "per_token",
                        "kv_cache": FP8_KV, "format_options": {},
                        "attention": {"format": "fp8_e4m3", "query": True, "scale": "tensor", "calibration": "unit",
                                      "probs": False, "probs_scale": 448.0, "options": {}}},
}
AMAX = {"input_amax": {"model.layers.0.self_attn.q_proj": 3.0}}


def _spec(name, **kw):
    return InjectionSpec(hardware=name, **(AMAX if name == "nvidia-b200-nvfp4" else {}), **kw)


@pytest.mark.parametrize("name", sorted(HARDWARE))
def test_preset_expands_into_explicit_fields_and_round_trips(name):
    spec = _spec(name)
    data = spec.to_dict()
    assert data["hardware"] == name and {k: data[k] for k in EXPECTED[name]} == EXPECTED[name]
    assert InjectionSpec.from_yaml(spec.to_yaml()) == spec  # the resolved YAML reloads to the same spec
    explicit = {k: v for k, v in data.items() if k != "hardware"}
    assert InjectionSpec(**explicit).to_dict() == {**data, "hardware": None}  # the fields alone say it all


def test_explicit_fields_must_agree_with_the_preset():
    assert InjectionSpec(hardware="amd-mi355-mxfp4", error_type="mxfp4", kv_cache="fp8_e4m3").error_type == "mxfp4"
    with pytest.raises(ValueError, match="means error_type='mxfp4'"):
        InjectionSpec(hardware="amd-mi355-mxfp4", error_type="nvfp4")
    with pytest.raises(ValueError, match="means kv_cache"):
        InjectionSpec(hardware="nvidia-h100-fp8", kv_cache={"format": "int8", "scale": "head_token"})
    with pytest.raises(ValueError, match="scheme 'MXFP4' means error_type='mxfp4'"):
        InjectionSpec(hardware="nvidia-b200-nvfp4", scheme="MXFP4", **AMAX)
    with pytest.raises(ValueError, match="did you mean 'nvidia-h100-fp8'"):
        InjectionSpec(hardware="nvidia-h100")
    with pytest.raises(ValueError, match="needs calibrated input amaxes"):  # never a silent dynamic scale
        InjectionSpec(hardware="nvidia-b200-nvfp4")
    assert InjectionSpec(hardware="amd-mi355-mxfp4").replace(seed=1).hardware is None  # copies carry the fields


@pytest.mark.parametrize("name", ["amd-mi355-mxfp4", "nvidia-h100-fp8"])
def test_presets_attach_to_dense_and_moe_models(name):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    for model in (tiny_llama(), tiny_moe("qwen3_moe")):
        with torch.no_grad():
            clean = model(ids).logits
            with attach(model, _spec(name)) as inj:
                assert not torch.equal(model(ids).logits, clean)
                inj.check_fired()
            assert torch.equal(model(ids).logits, clean)


def test_h100_fp8_per_token_inputs_on_every_expert():
    """nvidia-h100-fp8 on a routed expert: per-token FP8 inputs (a row's scale is the same before and after the
    routing split) and per-expert per-tensor FP8 weights."""
    model = tiny_moe("mixtral")
    _, experts = experts_of(model)[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    h = torch.randn(10, 64, generator=g) * torch.linspace(0.1, 20.0, 10)[:, None]
    tok_fmt, w_fmt = get_format("fp8_e4m3", granularity="per_token"), get_format("fp8_e4m3")
    want = torch.zeros_like(h)
    mask = F.one_hot(idx, experts.num_experts + 1).permute(2, 1, 0)
    for e in range(experts.num_experts):
        pos, tok = torch.where(mask[e])
        gate, up = F.linear(fake_quantize(h[tok], tok_fmt), fake_quantize(experts.gate_up_proj[e].detach(), w_fmt)
                            ).chunk(2, dim=-1)
        act = fake_quantize(experts.act_fn(gate) * up, tok_fmt)
        y = F.linear(act, fake_quantize(experts.down_proj[e].detach(), w_fmt)) * w[tok, pos, None]
        want.index_add_(0, tok, y)
    with torch.no_grad(), attach(model, _spec("nvidia-h100-fp8")) as inj:
        got = experts(h, idx, w)
        assert inj.input_scales()["model.layers.0.mlp.experts"] == "dynamic per-token"
    assert torch.equal(got, want)


def test_diagnose_prints_the_preset_expansion(capsys):
    from quarl.cli import main

    assert main(["diagnose", "--model", "testbed:tiny", "--hardware", "amd-mi355-mxfp4", "--no-grad-check"]) == 0
    out = capsys.readouterr().out
    assert "hardware amd-mi355-mxfp4: error_type=mxfp4, injection_point=both" in out and "kv_cache=" in out
