"""The lean hook path: activation functions bound at attach time equal `ErrorModel` (values and gradients), and
activation / gradient checkpointing neither double-counts fires nor changes the STE gradient.

Run: python -m pytest tests/inject/test_inject_hotpath.py -q
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from quarl.inject import InjectionSpec, attach
from quarl.inject.errors import ErrorModel
from quarl.inject.injector import _Rng, activation_fn, in_backward

SPECS = [InjectionSpec(scheme="W4A4"), InjectionSpec(scheme="NVFP4"),
         InjectionSpec(scheme="NVFP4", use_ste=False),
         InjectionSpec(error_type="mxfp4", injection_point="input", format_options={"ste": "clipped"}),
         InjectionSpec(error_type="mxfp4", injection_point="input", format_options={"rounding": "stochastic",
                                                                                     "seed": 3}),
         InjectionSpec(error_type="relative_gaussian", error_scale=0.05, injection_point="input")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.error_type}-{s.injection_point.value}-ste{s.use_ste}")
def test_activation_fn_equals_error_model(spec):
    error = ErrorModel.from_spec(spec)
    fn = activation_fn(error, _Rng(7, spec.is_noise))
    ref_rng = _Rng(7, spec.is_noise)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
        with torch.no_grad():
            assert torch.equal(fn(x), error(x, ref_rng(x.device)))
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fn(a), error(b, ref_rng(b.device))
        assert torch.equal(ya, yb) and ya.requires_grad == yb.requires_grad
        if ya.requires_grad:
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            assert torch.equal(a.grad, b.grad)


def test_in_backward_detects_the_backward_pass():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(in_backward())
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(in_backward())
            return g

    Probe.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == [False, True]


def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scheme", ["W4A4", "NVFP4"])
def test_hf_gradient_checkpointing_counts_one_fire_and_keeps_the_gradient(llama, ids, scheme):
    plain, ckpt = llama.train(), copy.deepcopy(llama).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inj_plain = attach(plain, InjectionSpec(scheme=scheme), phase="training", stats_every=1)
    inj_ckpt = attach(ckpt, InjectionSpec(scheme=scheme), phase="training", stats_every=1)
    g_plain, g_ckpt = _train_step(plain, ids), _train_step(ckpt, ids)
    assert g_plain.keys() == g_ckpt.keys() and len(g_plain) > 0
    for name in g_plain:
        assert torch.equal(g_plain[name], g_ckpt[name]), name  # bit for bit
    s_plain, s_ckpt = inj_plain.stats(), inj_ckpt.stats()
    for fqn in s_plain:
        assert s_ckpt[fqn]["fires"] == s_plain[fqn]["fires"] == {"training": 1}, fqn
        assert s_ckpt[fqn]["input"]["measured"] == s_plain[fqn]["input"]["measured"] == 1
        assert s_ckpt[fqn]["input"] == s_plain[fqn]["input"]
    inj_plain.detach()
    inj_ckpt.detach()


def test_torch_checkpoint_recompute_is_not_a_fire():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(4, 32)
    grads = []
    for use_ckpt in (False, True):
        model = copy.deepcopy(net)
        inj = attach(model, InjectionSpec(scheme="W4A4"), phase="training")
        xi = x.clone().requires_grad_()
        y = checkpoint(model, xi, use_reentrant=False) if use_ckpt else model(xi)
        y.square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
        assert all(s["fires"] == {"training": 1} for s in inj.stats().values())
        inj.detach()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_stats_every_zero_counts_fires_but_measures_no_activations(llama, ids):
    with attach(llama, InjectionSpec(scheme="W4A4"), stats_every=0) as inj, torch.no_grad():
        llama(ids)
        llama(ids)
        for s in inj.stats().values():
            assert s["fires"] == {"unset": 2} and "input" not in s and s["weight"]["measured"] == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="stats_every"):
            attach(llama, InjectionSpec(scheme="W4A4"), stats_every=bad)
