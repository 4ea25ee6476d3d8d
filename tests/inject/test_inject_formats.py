"""Format injection (quarl.formats): W4A4 equals the manual fq(x) @ fq(W)^T bit for bit, real HF models, STE.

Run: python -m pytest tests/inject/test_inject_formats.py -q
"""

import logging

import pytest
import torch
from torch import nn

from quarl.formats import fake_quantize
from quarl.inject import InjectionSpec, attach, inject_ops


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8_e4m3", "int4"])
def test_w4a4_equals_manual_fake_quant_bit_exactly(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64)
    manual = fake_quantize(x, fmt) @ fake_quantize(lin.weight.detach(), fmt).t()
    with attach(lin, InjectionSpec(error_type=fmt, injection_point="both")):
        assert torch.equal(lin(x), manual)
    with inject_ops(InjectionSpec(error_type=fmt, injection_point="both"), model=lin):
        assert torch.equal(lin(x), manual)


def test_w4a16_and_output_points_bit_exact():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 64)
    w_q = fake_quantize(lin.weight.detach(), "nvfp4")
    with attach(lin, InjectionSpec(scheme="NVFP4A16")):
        assert torch.equal(lin(x), nn.functional.linear(x, w_q, lin.bias))
    ref = lin(x)
    with attach(lin, InjectionSpec(error_type="mxfp4", injection_point="output")):
        assert torch.equal(lin(x), fake_quantize(ref, "mxfp4"))


@pytest.mark.parametrize("arch,scheme", [("llama", s) for s in ("W4A16", "W4A4", "NVFP4", "MXFP4A16", "FP8")]
                         + [("qwen2", "W4A4"), ("qwen2", "NVFP4A16")])
def test_hf_models_inject_and_restore(scheme, arch, request, ids):
    model = request.getfixturevalue(arch)
    ref = model(ids).logits
    with attach(model, InjectionSpec(scheme=scheme), phase="rollout") as inj:
        out = model(ids).logits
        stats = inj.stats()
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert torch.equal(model(ids).logits, ref)
    assert len(stats) == 14 and all(s["fires"] == {"rollout": 1} for s in stats.values())
    w = stats["model.layers.0.self_attn.q_proj"]["weight"]
    assert 0 < w["rel_err"] < 0.3 and w["sqnr_db"] > 10  # 4-bit formats on N(0, 0.02): ~ 12-20 dB


def test_w4a4_gradients_flow_through_ste_and_no_ste_cuts(llama, ids):
    """Failure mode 1 of docs/failure-modes.md on a real architecture: the input gradient of every projection exists
    with the STE, and is None for q/k/v/gate/up (whose inputs come only from a norm) without it."""
    captured = {}

    def keep_input(name):
        def hook(module, args):
            if args[0].requires_grad:
                args[0].retain_grad()
            captured[name] = args[0]
        return hook

    for use_ste in (True, False):
        captured.clear()
        embeds = llama.model.embed_tokens(ids).detach().requires_grad_()
        handles = [m.register_forward_pre_hook(keep_input(n), prepend=True)
                   for n, m in llama.named_modules() if n.endswith(("q_proj", "down_proj"))]
        with attach(llama, InjectionSpec(scheme="W4A4", use_ste=use_ste), phase="training"):
            llama(inputs_embeds=embeds, labels=ids).loss.backward()
        for h in handles:
            h.remove()
        grads = {n: t.grad for n, t in captured.items()}
        if use_ste:
            assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
            assert embeds.grad.abs().sum() > 0
        else:
            assert all(g is None for g in grads.values())
        llama.zero_grad(set_to_none=True)


def test_lora_w4a4_trains_adapters_only(lora_llama, ids):
    with attach(lora_llama, InjectionSpec(scheme="NVFP4"), phase="training") as inj:
        lora_llama(input_ids=ids, labels=ids).loss.backward()
        assert all(m.endswith("base_layer") or "lora_" not in m for m in inj.modules)
    grads = {n: p.grad for n, p in lora_llama.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())


def test_indivisible_block_is_named_in_log(caplog):
    model = nn.Sequential(nn.Linear(48, 16))
    with caplog.at_level(logging.WARNING):
        attach(model, InjectionSpec(scheme="MXFP4")).detach()
    assert "0 (Linear): 48 features is not a multiple of mxfp4 block_size 32" in caplog.text


def test_clipped_ste_option_reaches_formats():
    lin = nn.Sequential(nn.Linear(32, 4, bias=False))
    x = torch.full((1, 32), 0.5)
    # MX FLOOR: amax 7 -> scale 2^0, and 7 saturates to 6 (docs/formats.md, hand check `mx_saturation_amax7`)
    x[0, 0] = 7.0
    grads = {}
    for ste in ("clipped", "identity"):
        xg = x.clone().requires_grad_()
        spec = InjectionSpec(error_type="mxfp4", injection_point="input", format_options={"ste": ste})
        with attach(lin, spec):
            lin(xg).sum().backward()
        grads[ste] = xg.grad
    col_sum = lin[0].weight.detach().sum(0)  # d sum(x W^T) / dx
    assert torch.equal(grads["identity"][0], col_sum)
    assert grads["clipped"][0, 0] == 0 and torch.equal(grads["clipped"][0, 1:], col_sum[1:])
    with pytest.raises(ValueError, match="ste"):
        InjectionSpec(error_type="mxfp4", format_options={"ste": "clip"})


def test_fake_quant_calls_counted_weights_once_inputs_every_forward(monkeypatch, llama, ids):
    """Failure mode 7 of docs/failure-modes.md with the real format: 5 forwards of W4A4 quantize 14 weights once;
    each distinct activation tensor is quantized once per forward."""
    import quarl.formats

    calls = []
    real, real_bound = quarl.formats.fake_quantize, quarl.formats.fake_quantizer

    def bound(*a, **k):  # activations: the format bound once at attach (quarl.formats.fake_quantizer)
        fq = real_bound(*a, **k)
        return lambda x: calls.append(tuple(x.shape)) or fq(x)

    monkeypatch.setattr(quarl.formats, "fake_quantize",  # weights: ErrorModel.values
                        lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    monkeypatch.setattr(quarl.formats, "fake_quantizer", bound)
    with attach(llama, InjectionSpec(scheme="W4A4")) as inj:
        calls.clear()  # attach itself probes each module's shape once with a (1, K) zero row
        with torch.no_grad():
            for _ in range(5):
                llama(ids)
        weights = [c for c in calls if len(c) == 2]  # weights are 2-D, activations (B, T, K)
        # per block and forward, 4 distinct inputs: q/k/v share one, o, gate/up share one, down
        assert len(weights) == 14 and len(calls) - len(weights) == 5 * 2 * 4
        assert all(s["weight_computations"] == 1 and s["fires"] == {"unset": 5} for s in inj.stats().values())


def test_bf16_model_w4a4_runs_and_restores(llama, ids):
    llama = llama.to(torch.bfloat16)
    ref = llama(ids).logits
    with attach(llama, InjectionSpec(scheme="NVFP4"), phase="training"):
        out = llama(input_ids=ids, labels=ids)
        out.loss.backward()
        assert out.logits.dtype == torch.bfloat16 and not torch.equal(out.logits, ref)
    assert llama.model.layers[0].mlp.up_proj.weight.grad.dtype == torch.bfloat16
    assert torch.equal(llama(ids).logits, ref)


def test_shared_input_quantization_equals_per_module(llama, ids):
    """q/k/v (and gate/up) reuse one fake-quantized input: bit-identical to quantizing it in every module."""
    with attach(llama, InjectionSpec(scheme="NVFP4")):
        shared = llama(ids).logits
    # pre-hooks registered before attach run first: each module then sees its own copy, so nothing is shared
    hooks = [m.register_forward_pre_hook(lambda m, a: (a[0].clone(),)) for n, m in llama.named_modules()
             if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))]
    with attach(llama, InjectionSpec(scheme="NVFP4")):
        per_module = llama(ids).logits
    for h in hooks:
        h.remove()
    assert torch.equal(shared, per_module)
