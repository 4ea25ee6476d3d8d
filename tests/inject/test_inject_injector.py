"""The Injector: phase gating, bit-exact detach, weight cache per version, STE gradients, telemetry.

Regressions for failure modes 1 (no-STE cut), 5 (LoRA never quantized) and 7 (weights not re-quantized on every
forward) of docs/failure-modes.md. Noise models here; the format path is in test_inject_formats.py.

Run: python -m pytest tests/inject/test_inject_injector.py -q
"""

import pytest
import torch
from torch import nn

from quarl.inject import InjectionSpec, attach
from quarl.inject import errors as errors_mod

REL = dict(error_type="relative_gaussian", error_scale=0.05)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


@pytest.mark.parametrize("point", ["weight", "input", "output", "both"])
def test_detach_restores_outputs_and_state_bit_exactly(point, llama, ids):
    ref = llama(ids).logits
    snap = _snapshot(llama)
    inj = attach(llama, InjectionSpec(**REL, injection_point=point))
    assert not torch.equal(llama(ids).logits, ref)
    inj.detach()
    assert torch.equal(llama(ids).logits, ref) and _same_state(llama, snap)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in llama.modules())
    inj.detach()  # idempotent


def test_context_manager_detaches(qwen2, ids):
    ref = qwen2(ids).logits
    with attach(qwen2, InjectionSpec(**REL, injection_point="both")) as inj:
        assert not torch.equal(qwen2(ids).logits, ref)
    assert not inj.attached and torch.equal(qwen2(ids).logits, ref)


def test_phase_gating_and_counts():
    model, x = _mlp(), torch.randn(4, 16)
    ref = model(x)
    inj = attach(model, InjectionSpec(**REL, apply_during="rollout", injection_point="input"))
    with pytest.raises(RuntimeError, match="no phase is set"):
        model(x)  # never silently guess the phase
    with inj.phase("training"):
        assert torch.equal(model(x), ref)  # skipped: apply_during excludes training
    with inj.phase("rollout"):
        assert not torch.equal(model(x), ref)
        model(x)
    assert inj.current_phase is None  # the context restores the previous phase
    st = inj.stats()["0"]
    assert st["fires"] == {"rollout": 2} and st["skipped"] == {"training": 1}
    inj.set_phase("training")
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="unknown phase"):
        inj.set_phase("eval")


def test_bypassed_runs_the_clean_model_in_any_phase_and_restores():
    model, x = _mlp(), torch.randn(4, 16)
    ref = model(x)
    inj = attach(model, InjectionSpec(**REL, apply_during="both", injection_point="both"))
    with inj.bypassed():
        assert torch.equal(model(x), ref)
        with inj.phase("rollout"):  # a phase set inside the block does not switch the injection back on
            assert torch.equal(model(x), ref)
    assert not torch.equal(model(x), ref) and inj.current_phase is None
    with inj.phase("training"), inj.bypassed():
        assert torch.equal(model(x), ref)
    assert not torch.equal(model(x), ref)
    st = inj.stats()["0"]
    assert st["skipped"] == {"bypassed": 3} and st["fires"] == {"unset": 2}


def test_phase_is_not_inferred_from_module_training():
    model, x = _mlp(), torch.randn(4, 16)
    ref = model(x)
    inj = attach(model, InjectionSpec(**REL, apply_during="training", injection_point="input"), phase="rollout")
    model.train()  # HF/TRL keep training=True during generation: must not switch the injection on
    assert torch.equal(model(x), ref)
    inj.detach()


def test_unset_phase_with_both_is_on_and_visible_in_telemetry():
    model = _mlp()
    inj = attach(model, InjectionSpec(**REL))
    model(torch.randn(2, 16))
    assert inj.stats()["2"]["fires"] == {"unset": 1}
    inj.check_fired()


def test_weight_error_computed_once_per_version(monkeypatch):
    """failure mode 7 in docs/failure-modes.md: weights must not be re-quantized and cloned on every forward."""
    calls = []
    real = errors_mod.relative_gaussian
    monkeypatch.setitem(errors_mod._NOISE, "relative_gaussian", lambda *a: calls.append(1) or real(*a))
    model, x = _mlp(), torch.randn(4, 16)
    inj = attach(model, InjectionSpec(**REL))  # weight only
    outs = [model(x) for _ in range(5)]
    assert len(calls) == 2 and inj.stats()["0"]["weight_computations"] == 1  # 2 modules x 1 version
    assert all(torch.equal(o, outs[0]) for o in outs)  # the same cached e(W) every time
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()  # in-place update bumps param._version -> cache invalidated
    model(x)
    assert len(calls) == 4 and inj.stats()["0"]["weight_computations"] == 2
    with torch.no_grad():
        model[0].weight.copy_(torch.zeros(32, 16))
    model(x)
    assert inj.stats()["0"]["weight_computations"] == 3


def test_ste_gradients_nonzero_and_no_ste_cut():
    """failure mode 1 in docs/failure-modes.md: without the STE the gradient through the injected input is cut."""
    model = _mlp()
    x = torch.randn(4, 16, requires_grad=True)
    with attach(model, InjectionSpec(**REL, injection_point="both")):
        model(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    x.grad = None
    model.zero_grad(set_to_none=True)
    with attach(model, InjectionSpec(**REL, injection_point="both", use_ste=False)):
        model(x).square().sum().backward()
    assert x.grad is None  # the input path is cut ...
    assert model[0].weight.grad is None and model[2].weight.grad is None  # ... and so is the weight path
    assert model[2].bias.grad is not None  # only the (uninjected) bias still learns


def test_no_ste_logs_loud_warning(caplog):
    with caplog.at_level("WARNING"):
        attach(_mlp(), InjectionSpec(**REL, injection_point="input", use_ste=False)).detach()
    assert "use_ste=False" in caplog.text and "CUT" in caplog.text


def test_ste_weight_gradient_equals_gradient_at_injected_weight():
    """With an identity STE, dL/dW equals dL/dW evaluated with W replaced by e(W)."""
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    with attach(lin, InjectionSpec(**REL)) as inj:  # a bare layer is its own root: fqn ""
        lin(x).square().sum().backward()
        e_w = inj._modules[""].weight._value.clone()
    expected = 2 * (x @ e_w.t()).t() @ x  # d/dW sum((x W^T)^2) at W = e(W)
    # fp32 matmul of K=4/16 terms in a different association order: a few ulps of |values| ~ 1e1
    torch.testing.assert_close(lin.weight.grad, expected, atol=1e-5, rtol=1e-6)


def test_exception_in_forward_restores_weight():
    class BoomLinear(nn.Linear):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(BoomLinear(4, 4))
    param = model[0].weight
    inj = attach(model, InjectionSpec(**REL))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(1, 4))
    assert model[0].weight is param and isinstance(model[0]._parameters["weight"], nn.Parameter)
    inj.detach()


def test_seeded_noise_reproducible_across_attaches():
    x = torch.randn(4, 16)
    model = _mlp()
    outs = []
    for seed in (1, 1, 2):
        with attach(model, InjectionSpec(**REL, injection_point="both", seed=seed)):
            outs.append(model(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_telemetry_matches_requested_error_scale(llama, ids):
    inj = attach(llama, InjectionSpec(error_type="relative_gaussian", error_scale=0.1, injection_point="both"))
    llama(ids)
    st = inj.stats()["model.layers.0.mlp.down_proj"]
    # relative gaussian: ||x*s*N|| / ||x|| ~ s = 0.1; weight has 8192 elements -> 1-2% spread; input 2*12*128
    assert abs(st["weight"]["rel_err"] - 0.1) < 0.01 and abs(st["input"]["rel_err"] - 0.1) < 0.01
    assert abs(st["weight"]["sqnr_db"] - 20.0) < 1.0
    assert st["fires"] == {"unset": 1} and st["input"]["measured"] == 1
    inj.detach()


def test_never_fired_is_reported(llama, ids):
    inj = attach(llama, InjectionSpec(**REL, quantize_lm_head=True))
    llama.model(ids)  # the body only: lm_head never runs
    assert inj.never_fired() == ["lm_head"]
    with pytest.raises(RuntimeError, match="never fired.*lm_head"):
        inj.check_fired()
    inj.detach()


def test_lora_params_untouched_and_receive_gradients(lora_llama, ids):
    """failure mode 5 in docs/failure-modes.md: adapters are never quantized; their gradients flow through the injected
    base."""
    adapters = {n: p.detach().clone() for n, p in lora_llama.named_parameters() if "lora_" in n}
    inj = attach(lora_llama, InjectionSpec(**REL, injection_point="both"), phase="training")
    assert not any("lora_" in m for m in inj.modules)
    out = lora_llama(input_ids=ids, labels=ids)
    out.loss.backward()
    for n, p in lora_llama.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            assert torch.equal(p.detach(), adapters[n])
        else:
            assert p.grad is None  # frozen base
    inj.detach()


@pytest.mark.parametrize("every,measured", [(16, 2), (1, 20)])
def test_activation_stats_sampling(every, measured):
    model, x = _mlp(), torch.randn(2, 16)
    with attach(model, InjectionSpec(**REL, injection_point="input"), stats_every=every) as inj:
        for _ in range(20):
            model(x)
        st = inj.stats()["0"]
    assert st["fires"] == {"unset": 20} and st["input"]["measured"] == measured  # calls 1 and 17 when every=16
