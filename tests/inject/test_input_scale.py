"""`InjectionSpec.input_scale` = dynamic | static | per_token: the activation scale the injected linear inputs use.

Run: pytest tests/inject/test_input_scale.py -q

* the spec validates the mode strictly (formats with a per-tensor activation scale only, the input injected,
  static needs calibrated amaxes, amaxes need static) and round-trips through YAML;
* attached, each module's input is exactly ``fake_quantize`` with the mode's format (static: that module's
  calibrated amax; per_token: one global scale per row), the weights are untouched by the mode, q/k/v still share
  one quantized input, the STE gradient flows, and a static spec missing a module's amax refuses to attach;
* ``Injector.input_scales()`` reports the mode each module actually bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quarl.formats import fake_quantize, get_format
from quarl.inject import InjectionSpec, attach


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.o_proj = nn.Linear(32, 32)

    def forward(self, x):
        return self.o_proj(self.q_proj(x) + self.k_proj(x) * self.v_proj(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Attn()


AMAX = {"q_proj": 3.0, "k_proj": 3.0, "v_proj": 3.0, "o_proj": 40.0}


def _x() -> torch.Tensor:
    return torch.randn(5, 32, generator=torch.Generator().manual_seed(1)) * 2


# --- spec --------------------------------------------------------------------------------------------------------
def test_default_is_dynamic_and_options_per_mode():
    assert InjectionSpec(scheme="NVFP4").input_scale == "dynamic"
    assert InjectionSpec(scheme="NVFP4").input_format_options() == {}
    per_token = InjectionSpec(scheme="NVFP4", input_scale="per_token")
    assert per_token.input_format_options() == {"tensor_scale": "per_token"}
    assert InjectionSpec(scheme="FP8", input_scale="per_token").input_format_options() == {"granularity": "per_token"}
    spec = InjectionSpec(scheme="FP8", input_scale="static", input_amax={"a": 2})
    assert spec.input_format_options() == {"tensor_scale": "static", "granularity": "per_tensor"}
    assert spec.input_amax == {"a": 2.0} and isinstance(spec.input_amax["a"], float)


@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "NVFP4", "input_scale": "statc"}, "did you mean 'static'"),
    ({"scheme": "NVFP4", "input_scale": "static"}, "needs calibrated input amaxes"),
    ({"scheme": "NVFP4", "input_amax": {"a": 1.0}}, "only read with input_scale='static'"),
    ({"scheme": "NVFP4", "input_scale": "per_token", "input_amax": {"a": 1.0}}, "only read with"),
    ({"scheme": "MXFP4", "input_scale": "per_token"}, "'mxfp4' has none"),
    ({"scheme": "NVFP4A16", "input_scale": "per_token"}, "does not inject it"),
    ({"error_type": "relative_gaussian", "error_scale": 0.1, "injection_point": "input", "input_scale": "per_token"},
     "has none"),
    ({"scheme": "NVFP4", "input_scale": "static", "input_amax": {"a": float("nan")}}, "not a finite amax"),
    ({"scheme": "NVFP4", "input_scale": "static", "input_amax": {"a": -1.0}}, "not a finite amax"),
    ({"scheme": "NVFP4", "input_scale": "static", "input_amax": {"a": True}}, "not a finite amax"),
    ({"scheme": "NVFP4", "input_scale": "static", "input_amax": [1.0]}, "must be a mapping"),
    ({"scheme": "FP8", "input_scale": "static", "input_amax": {"a": 1.0}, "format_options": {"granularity":
      "per_token"}}, "means granularity='per_tensor'"),
    ({"scheme": "NVFP4", "format_options": {"tensor_scale": "static"}}, "set input_scale instead"),
])
def test_invalid_specs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InjectionSpec(**kwargs)


def test_yaml_round_trip_and_strict_keys():
    spec = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax={"model.layers.0.q_proj": 0.1 + 0.2})
    assert InjectionSpec.from_yaml(spec.to_yaml()) == spec
    with pytest.raises(ValueError, match="input_scale"):
        InjectionSpec.from_dict({"scheme": "NVFP4", "input_scales": "static"})
    assert spec.replace(input_scale="dynamic", input_amax={}).input_scale == "dynamic"


# --- attached ----------------------------------------------------------------------------------------------------
def _quantized_inputs(model, spec, x):
    """The tensor each linear's forward actually receives (after the injection's pre-hook), by wrapping forward."""
    got = {}
    originals = {}
    for name, module in model.named_children():
        originals[name] = module.forward

        def forward(inp, _n=name, _f=module.forward):
            got[_n] = inp.detach().clone()
            return _f(inp)
        module.forward = forward
    try:
        with attach(model, spec) as inj:
            y = model(x)
            modes = inj.input_scales()
    finally:
        for name, module in model.named_children():
            module.forward = originals[name]
    return got, y, modes


def test_static_uses_each_modules_calibrated_amax():
    model, x = _model(), _x()
    spec = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=AMAX)
    got, _, modes = _quantized_inputs(model, spec, x)
    fmt = get_format("nvfp4", tensor_scale="static")
    assert torch.equal(got["q_proj"], fake_quantize(x, fmt, global_amax=torch.tensor([3.0])))
    assert not torch.equal(got["q_proj"], fake_quantize(x, "nvfp4"))  # really not the dynamic scale
    assert modes["q_proj"] == "static (calibrated amax 3)" and modes["o_proj"] == "static (calibrated amax 40)"


def test_static_weights_are_unaffected():
    model, x = _model(), _x()
    static = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=AMAX)
    weight_only = InjectionSpec(scheme="NVFP4A16")
    seen = {}
    for spec in (static, weight_only):
        with attach(model, spec) as inj:
            model(x)
            seen[spec.injection_point.value] = {k: v["weight"]["rel_err"] for k, v in inj.stats().items()}
    assert seen["both"] == seen["weight"]


def test_per_token_nvfp4_and_fp8():
    model, x = _model(), _x()
    got, _, modes = _quantized_inputs(model, InjectionSpec(scheme="NVFP4", input_scale="per_token"), x)
    assert torch.equal(got["q_proj"], fake_quantize(x, "nvfp4", tensor_scale="per_token"))
    assert modes["k_proj"] == "per-token global scale"
    got, _, modes = _quantized_inputs(model, InjectionSpec(scheme="FP8", input_scale="per_token"), x)
    assert torch.equal(got["q_proj"], fake_quantize(x, "fp8_e4m3", granularity="per_token"))
    assert modes["q_proj"] == "dynamic per-token"


def test_fp8_static():
    model, x = _model(), _x()
    got, _, modes = _quantized_inputs(model, InjectionSpec(scheme="FP8", input_scale="static", input_amax=AMAX), x)
    s = torch.tensor([3.0]) / 448
    assert torch.equal(got["v_proj"], (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s)


def test_dynamic_reports_and_matches_default():
    model, x = _model(), _x()
    got, _, modes = _quantized_inputs(model, InjectionSpec(scheme="NVFP4"), x)
    assert torch.equal(got["q_proj"], fake_quantize(x, "nvfp4"))
    assert set(modes.values()) == {"dynamic per-tensor global scale"}
    _, _, modes = _quantized_inputs(model, InjectionSpec(scheme="MXFP4"), x)
    assert set(modes.values()) == {"per-block E8M0 (no tensor scale)"}
    with attach(model, InjectionSpec(scheme="NVFP4A16")) as inj:
        assert inj.input_scales() == {}


def test_shared_input_respects_each_modules_scale():
    """q/k/v read the same tensor: one quantized copy when their amax agrees, separate ones when it does not."""
    model, x = _model(), _x()
    amax = dict(AMAX, k_proj=7.0)
    got, _, _ = _quantized_inputs(model, InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=amax), x)
    fmt = get_format("nvfp4", tensor_scale="static")
    assert torch.equal(got["q_proj"], fake_quantize(x, fmt, global_amax=torch.tensor([3.0])))
    assert torch.equal(got["k_proj"], fake_quantize(x, fmt, global_amax=torch.tensor([7.0])))
    assert torch.equal(got["v_proj"], got["q_proj"])


def test_static_missing_module_refuses_to_attach(caplog):
    model = _model()
    spec = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax={"q_proj": 1.0, "k_proj": 1.0})
    with pytest.raises(ValueError, match=r"2 selected modules have no calibrated input amax in input_amax: v_proj"):
        attach(model, spec)
    extra = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=dict(AMAX, lm_head=1.0))
    with caplog.at_level("WARNING"):
        attach(model, extra).detach()
    assert "unused: lm_head" in caplog.text


def test_static_ste_gradient_reaches_the_input():
    model, x = _model(), _x().requires_grad_()
    with attach(model, InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=AMAX)):
        model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_operator_level_injection_refuses_non_dynamic_modes():
    from quarl.inject import inject_ops

    for spec in (InjectionSpec(scheme="NVFP4", input_scale="per_token"),
                 InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=AMAX)):
        with pytest.raises(ValueError, match="inject_ops does not implement input_scale"):
            inject_ops(spec, model=_model())


def test_static_amaxes_serve_the_lora_wrapped_model():
    """Calibrated on the plain model, attached to the PEFT model (``base_model.model.…q_proj.base_layer``): the
    same scales; with LoRA's B = 0 the logits equal the plain model's under the same spec, bit for bit."""
    from peft import LoraConfig, get_peft_model

    from quarl.inject.input_scale import canonical

    assert canonical("base_model.model.layers.0.q_proj.base_layer") == "layers.0.q_proj"
    x = _x()
    spec = InjectionSpec(scheme="NVFP4", input_scale="static", input_amax=AMAX)
    model = _model()
    with attach(model, spec), torch.no_grad():
        want = model(x)
    peft_model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with attach(peft_model, spec) as inj, torch.no_grad():
        got = peft_model(x)
        modes = inj.input_scales()
    assert torch.equal(got, want)
    assert modes["base_model.model.q_proj.base_layer"] == "static (calibrated amax 3)"
