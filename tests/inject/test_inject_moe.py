"""MoE injection on tiny random Qwen2-MoE / Qwen3-MoE / Mixtral: every routed expert's weights and inputs quantized per
expert, routers and shared-expert gates untouched, lossless weight error keeps routing, detach restores bit-exactly,
STE gradients reach expert weights and LoRA, an unknown module family is reported.

Run: OMP_NUM_THREADS=1 python -m pytest tests/inject/test_inject_moe.py -q
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from _tiny_moe import ARCHS, experts_of, routers_of, tiny_moe
from torch import nn
from torch.overrides import TorchFunctionMode

from quarl.formats import fake_quantize, get_format
from quarl.inject import InjectionSpec, Phase, attach, select_modules
from quarl.inject.experts import DISPATCH_PREFIX, experts_forward

IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))


def _registry_keys():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return [k for k in ALL_EXPERTS_FUNCTIONS if k.startswith(DISPATCH_PREFIX)]


def _routing(model, ids):
    """Run the model and return (logits, [top-k expert indices of every router call])."""
    picks = []
    hooks = [m.register_forward_hook(lambda mod, a, out: picks.append(out[2].clone()))
             for n, m in routers_of(model) if type(m).__name__.endswith("Router")]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, picks


def _route(experts, tokens, seed=0):
    """Random routing of ``tokens`` tokens over all experts: (T, 2) distinct indices and (T, 2) weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(tokens)])
    return idx, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_selection_experts_in_routers_and_shared_gate_out(arch):
    model = tiny_moe(arch)
    names = [n for n, _ in select_modules(model, InjectionSpec(scheme="MXFP4"))]
    assert [n for n, _ in experts_of(model)] == [n for n in names if n.endswith("experts")] and len(experts_of(model))
    routers = [n for n, _ in routers_of(model)]
    assert routers and not set(routers) & set(names)
    if arch == "qwen2_moe":  # the shared expert follows the dense rules; its sigmoid gate is a router
        assert "model.layers.0.mlp.shared_expert.down_proj" in names
        assert "model.layers.0.mlp.shared_expert_gate" in routers


@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_matmul_sees_grid_weights_and_inputs(arch):
    """MXFP4 W4A4: each expert's two matmuls get an on-grid input and the expert's own on-grid weight slice."""
    model = tiny_moe(arch)
    _, experts = experts_of(model)[0]
    idx, w = _route(experts, 16)
    h = torch.randn(16, 64)
    fmt = get_format("mxfp4")
    seen = []

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                seen.append((args[0].detach(), args[1].detach()))
            return func(*args, **(kwargs or {}))

    with attach(model, InjectionSpec(scheme="MXFP4")), Capture():
        experts(h, idx, w)
    assert len(seen) == 2 * experts.num_experts  # every expert was routed to and ran both matmuls
    for x, weight in seen:
        assert torch.equal(fake_quantize(x, fmt), x) and not torch.equal(x, torch.zeros_like(x))
        assert torch.equal(fake_quantize(weight, fmt), weight)
    ups = [weight for i, (_, weight) in enumerate(seen) if i % 2 == 0]
    clean = {tuple(torch.equal(fake_quantize(experts.gate_up_proj[e].detach(), fmt), u) for u in ups)
             for e in range(experts.num_experts)}
    assert all(sum(row) >= 1 for row in clean)  # each weight used is some expert's own quantized slice


@pytest.mark.parametrize("arch", ARCHS)
def test_nvfp4_scales_are_per_expert_weights_and_inputs(arch):
    """NVFP4's tensor-level scale is taken per expert (weight slice and routed tokens), never across experts: the
    injected experts equal a reference that quantizes each expert on its own, and differ from cross-expert scales."""
    model = tiny_moe(arch)
    _, experts = experts_of(model)[0]
    with torch.no_grad():
        experts.gate_up_proj[0].mul_(40.0)  # one loud expert: a shared global scale would crush the others
    idx, w = _route(experts, 16, seed=1)
    h = torch.randn(16, 64) * torch.linspace(0.1, 30.0, 16)[:, None]
    fmt = get_format("nvfp4")

    def reference(per_expert_weights: bool) -> torch.Tensor:
        gate_up = experts.gate_up_proj.detach()
        whole = fake_quantize(gate_up, fmt)  # the 3-D tensor at once: one global scale over all experts
        out = torch.zeros_like(h)
        mask = F.one_hot(idx, experts.num_experts + 1).permute(2, 1, 0)
        for e in range(experts.num_experts):
            pos, tok = torch.where(mask[e])
            w1 = fake_quantize(gate_up[e], fmt) if per_expert_weights else whole[e]
            gate, up = F.linear(fake_quantize(h[tok], fmt), w1).chunk(2, dim=-1)
            act = fake_quantize(experts.act_fn(gate) * up, fmt)
            y = F.linear(act, fake_quantize(experts.down_proj[e].detach(), fmt)) * w[tok, pos, None]
            out.index_add_(0, tok, y)
        return out

    with torch.no_grad(), attach(model, InjectionSpec(scheme="NVFP4")):
        got = experts(h, idx, w)
    assert torch.equal(got, reference(per_expert_weights=True))
    assert not torch.equal(got, reference(per_expert_weights=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_expert_weights_keep_routing_and_logits(arch):
    """Expert weights already on the MXFP4 grid: weight-only MXFP4 on the experts changes nothing, bit for bit, with
    the model's own (grouped_mm) experts implementation running on the swapped weights."""
    model = tiny_moe(arch)
    with torch.no_grad():
        for _, experts in experts_of(model):
            for p in (experts.gate_up_proj, experts.down_proj):
                p.copy_(torch.stack([fake_quantize(m, "mxfp4") for m in p]))
    logits, picks = _routing(model, IDS)
    inj = attach(model, InjectionSpec(scheme="MXFP4A16", targets=(r"\.experts$",)))
    got, got_picks = _routing(model, IDS)
    assert inj.modules == [n for n, _ in experts_of(model)]
    assert all(s["fires"] == {"unset": 1} and s["weight"]["rel_err"] == 0.0 for s in inj.stats().values())
    assert torch.equal(got, logits) and len(picks) == len(got_picks) == 2
    assert all(torch.equal(a, b) for a, b in zip(picks, got_picks))
    inj.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_routers_untouched_and_detach_bit_exact(arch):
    model = tiny_moe(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config._experts_implementation
    logits, picks = _routing(model, IDS)
    routers = routers_of(model)
    clean = {n: (m.weight, m.weight.detach().clone()) for n, m in routers}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, mod.weight)) for n, m in routers]
    inj = attach(model, InjectionSpec(scheme="NVFP4"))
    key = model.config._experts_implementation
    assert key.startswith(DISPATCH_PREFIX) and key in _registry_keys()
    q_logits, _ = _routing(model, IDS)
    for h in hooks:
        h.remove()
    assert set(seen) == set(clean)
    assert all(seen[n] is clean[n][0] and torch.equal(seen[n], clean[n][1]) for n in clean)  # never swapped
    assert not torch.equal(q_logits, logits)
    inj.check_fired()
    inj.detach()
    assert model.config._experts_implementation == implementation and key not in _registry_keys()
    after, after_picks = _routing(model, IDS)
    assert torch.equal(after, logits) and all(torch.equal(a, b) for a, b in zip(picks, after_picks))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_identity_errors_give_the_stock_eager_experts_bit_for_bit():
    for arch in (*ARCHS, "gpt_oss"):
        _, experts = experts_of(tiny_moe(arch))[0]
        idx, w = _route(experts, 12)
        h = torch.randn(12, 64)
        with torch.no_grad():
            stock = type(experts).forward.__wrapped__(experts, h, idx, w)
            assert torch.equal(experts_forward(experts, h, idx, w, lambda x: x, lambda x: x), stock)


def test_phases_gate_the_expert_activations():
    model = tiny_moe("qwen2_moe")
    _, experts = experts_of(model)[0]
    idx, w = _route(experts, 8)
    h = torch.randn(8, 64)
    with torch.no_grad():
        clean = experts(h, idx, w)
        inj = attach(model, InjectionSpec(scheme="MXFP4", apply_during="rollout"))
        with inj.phase(Phase.TRAINING):
            assert torch.equal(experts(h, idx, w), clean)  # inactive: the stock implementation, clean weights
        with inj.phase(Phase.ROLLOUT):
            assert not torch.equal(experts(h, idx, w), clean)
        with inj.phase(Phase.ROLLOUT), inj.bypassed():
            assert torch.equal(experts(h, idx, w), clean)
    stats = inj.stats()["model.layers.0.mlp.experts"]
    assert stats["fires"] == {"rollout": 1} and stats["skipped"] == {"training": 1, "bypassed": 1}
    assert stats["weight_computations"] == 2 and stats["input"]["measured"] == 2 * experts.num_experts
    inj.detach()


def test_ste_gradients_reach_expert_weights_and_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_moe("qwen2_moe")
    for use_ste in (True, False):
        model.zero_grad(set_to_none=True)
        with attach(model, InjectionSpec(error_type="mxfp4", injection_point="both", use_ste=use_ste)):
            model(IDS).logits.square().mean().backward()
        grad = model.model.layers[0].mlp.experts.gate_up_proj.grad
        assert (grad is not None and grad.abs().sum() > 0) if use_ste else grad is None
    lora = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inj = attach(lora, InjectionSpec(scheme="MXFP4"))
    assert any(n.endswith("mlp.experts") for n in inj.modules)
    lora(IDS).logits.square().mean().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    inj.detach()


def test_lora_wrapped_shared_expert_gate_stays_a_router():
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=4, target_modules="all-linear"))
    names = [n for n, _ in select_modules(lora, InjectionSpec(scheme="MXFP4"))]
    assert any(n.endswith("shared_expert.up_proj.base_layer") for n in names)
    assert not any("shared_expert_gate" in n for n in names)


def test_second_activation_injection_on_the_same_experts_is_refused():
    model = tiny_moe("mixtral")
    first = attach(model, InjectionSpec(scheme="MXFP4"))
    with pytest.raises(ValueError, match="another quarl injection"):
        attach(model, InjectionSpec(scheme="NVFP4"))
    keys = set(_registry_keys())
    first.detach()
    attach(model, InjectionSpec(scheme="NVFP4")).detach()
    assert len(keys) - len(set(_registry_keys())) == 1  # the first one's registration is gone, no new one left


class _ToyExperts(nn.Module):
    """A 3-D experts container transformers does not know (no ``@use_experts_implementation``)."""

    def __init__(self, experts: int, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, width, width))

    def forward(self, x):
        return torch.einsum("th,eoh->to", x, self.w)


class _Toy(nn.Module):
    def __init__(self, experts: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(64, width)
        self.experts = _ToyExperts(experts, width)

    def forward(self, x):
        return self.experts(self.proj(x))


def test_unknown_experts_family_is_loud(caplog):
    big = _Toy(experts=8, width=64)  # 8*64*64 of 8*64*64 + 64*64 matmul parameters: 88.9%
    with pytest.raises(ValueError, match=r"_ToyExperts.*88\.9% of the matmul parameters"):
        attach(big, InjectionSpec(scheme="MXFP4"))
    attach(big, InjectionSpec(scheme="MXFP4", exclude=("experts",))).detach()  # knowingly left out: allowed
    small = _Toy(experts=1, width=4)  # 16 of 272: 5.9% -> still an error; 2 experts of 2x2 would warn
    with pytest.raises(ValueError, match="_ToyExperts"):
        attach(small, InjectionSpec(scheme="MXFP4"))
    small.experts.w = nn.Parameter(torch.randn(1, 2, 2))
    small.proj = nn.Linear(64, 2)
    with caplog.at_level(logging.WARNING, logger="quarl.inject.select"):
        attach(small, InjectionSpec(scheme="W4A16", error_type="int4", format_options={"group_size": 32})).detach()
    assert any("_ToyExperts" in r.getMessage() and "full precision" in r.getMessage() for r in caplog.records)


def test_lora_on_expert_weights_quantizes_the_base_under_the_adapter():
    """PEFT's all-linear LoRA parametrizes the 3-D expert weights as W + B A during its forward: quarl swaps
    ``original`` so the forward is e(W) + B A. With B = 0 that is exactly the plain model's injected forward."""
    from peft import LoraConfig, get_peft_model

    plain = tiny_moe("qwen2_moe")
    lora = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=4, target_modules="all-linear"))
    assert any("experts" in n and "lora_B" in n for n, _ in lora.named_parameters())
    with torch.no_grad():
        clean = lora(IDS).logits
        with attach(plain, InjectionSpec(scheme="MXFP4A16")):
            want = plain(IDS).logits
        with attach(lora, InjectionSpec(scheme="MXFP4A16")) as inj:
            got = lora(IDS).logits
            assert sum(n.endswith("experts.base_layer.base_layer") for n in inj.modules) == 2
    assert torch.equal(got, want) and not torch.equal(got, clean)


def test_operator_level_injection_refuses_fused_experts():
    from quarl.inject import inject_ops

    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="cannot inject fused MoE experts"):
        inject_ops(InjectionSpec(scheme="MXFP4"), model=model)
    with inject_ops(InjectionSpec(scheme="MXFP4", exclude=("experts", "embed")), model=model) as ops, torch.no_grad():
        model(IDS)
    assert ops.module_calls and not any("experts" in n for n in ops.module_calls)


def test_output_error_on_each_expert_matmul_and_noise_models_per_expert():
    model = tiny_moe("qwen2_moe")
    _, experts = experts_of(model)[0]
    idx, w = _route(experts, 12, seed=3)
    h = torch.randn(12, 64)
    fmt = get_format("mxfp8_e4m3")
    want = torch.zeros_like(h)
    mask = F.one_hot(idx, experts.num_experts + 1).permute(2, 1, 0)
    for e in range(experts.num_experts):  # output: e() on the result of each of the expert's two matmuls
        pos, tok = torch.where(mask[e])
        gate, up = fake_quantize(F.linear(h[tok], experts.gate_up_proj[e]), fmt).chunk(2, dim=-1)
        y = fake_quantize(F.linear(experts.act_fn(gate) * up, experts.down_proj[e]), fmt) * w[tok, pos, None]
        want.index_add_(0, tok, y)
    with torch.no_grad():
        clean = experts(h, idx, w)
        with attach(model, InjectionSpec(error_type="mxfp8_e4m3", injection_point="output")) as inj:
            assert torch.equal(experts(h, idx, w), want)
            assert inj.stats()["model.layers.0.mlp.experts"]["output"]["measured"] == 2 * experts.num_experts
        noise = InjectionSpec(error_type="relative_gaussian", error_scale=0.05, targets=(r"\.experts$",))
        with attach(model, noise) as inj:
            noisy = experts(h, idx, w)
            assert not torch.equal(noisy, clean) and torch.equal(experts(h, idx, w), noisy)  # one draw per version
            assert inj.stats()["model.layers.0.mlp.experts"]["weight_computations"] == 2
        assert torch.equal(experts(h, idx, w), clean)


def test_merging_expert_lora_invalidates_the_cached_expert_weights():
    """PEFT's merge writes W + B A into the expert weights through .data (no version bump): the next forward must
    re-quantize, so the merged model's injected output equals the unmerged one's (e(W + BA) vs e(W) + BA differ;
    what matters is that the cache never serves e(W) for a merged W)."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    with torch.no_grad(), attach(lora, InjectionSpec(scheme="MXFP4A16")):
        lora(IDS)
        lora.merge_adapter()
        merged = lora(IDS).logits
        lora.unmerge_adapter()
    plain = get_peft_model(tiny_moe("qwen2_moe"), LoraConfig(r=4, target_modules="all-linear"))
    plain.load_state_dict(lora.state_dict())
    with torch.no_grad():
        plain.merge_adapter()
        with attach(plain, InjectionSpec(scheme="MXFP4A16")):
            fresh = plain(IDS).logits  # a cache that never saw the unmerged weights
    assert torch.equal(merged, fresh)


@pytest.mark.parametrize(("fqn", "cls", "router"), [
    ("model.layers.0.mlp.gate", "Qwen2MoeTopKRouter", True),
    ("model.layers.0.mlp.shared_expert_gate", "Linear", True),
    ("model.layers.0.mlp.shared_expert_gate.base_layer", "Linear", True),  # inside a PEFT LoRA wrapper
    ("model.layers.0.mlp.router", "Linear", True),
    ("model.layers.0.block_sparse_moe.gate", "Linear", True),
    ("model.layers.0.mlp.moe", "MoEGate", True),
    ("model.layers.0.mlp.gate_proj", "Linear", False),
    ("model.layers.0.mlp.gate_up_proj", "Linear", False),
    ("model.layers.0.self_attn.q_proj", "Linear", False),
])
def test_router_rule(fqn, cls, router):
    from quarl.inject.select import is_router

    module = type(cls, (nn.Module,), {})()
    assert is_router(module, fqn) is router


def test_dense_models_have_no_uncovered_family(caplog):
    from _tiny_models import tiny_llama

    from quarl.inject.select import uncovered_families

    model = tiny_llama()
    spec = InjectionSpec(scheme="MXFP4")
    assert uncovered_families(model, spec, select_modules(model, spec)) == []
    with caplog.at_level(logging.WARNING, logger="quarl.inject.select"):
        attach(model, spec).detach()
    assert not [r for r in caplog.records if r.name == "quarl.inject.select"]


def test_transposed_experts_with_biases_blocks_along_the_input_dim():
    """GPT-OSS stores experts as (E, in, out) with biases and an interleaved gate/up: blocks must run along ``in``
    (dim -2 there), and the result equals a per-expert reference, not one blocked along ``out``."""
    model = tiny_moe("gpt_oss")
    assert "model.layers.0.mlp.router" not in [n for n, _ in select_modules(model, InjectionSpec(scheme="MXFP4"))]
    _, experts = experts_of(model)[0]
    idx, w = _route(experts, 12, seed=4)
    h = torch.randn(12, 64)
    fmt = get_format("mxfp4")

    def reference(along_input: bool) -> torch.Tensor:
        def wq(t):  # t: (in, out)
            return fake_quantize(t.T, fmt).T if along_input else fake_quantize(t, fmt)
        out = torch.zeros_like(h)
        mask = F.one_hot(idx, experts.num_experts + 1).permute(2, 1, 0)
        for e in range(experts.num_experts):
            pos, tok = torch.where(mask[e])
            gate_up = fake_quantize(h[tok], fmt) @ wq(experts.gate_up_proj[e].detach()) + experts.gate_up_proj_bias[e]
            act = fake_quantize(experts._apply_gate(gate_up), fmt)
            y = (act @ wq(experts.down_proj[e].detach()) + experts.down_proj_bias[e]) * w[tok, pos, None]
            out.index_add_(0, tok, y)
        return out

    with torch.no_grad(), attach(model, InjectionSpec(scheme="MXFP4")):
        got = experts(h, idx, w)
    with torch.no_grad():
        assert torch.equal(got, reference(along_input=True))
        assert not torch.equal(got, reference(along_input=False))
