"""Operator-level injection: only calls using a selected module's weight are injected, only inside the context.

Run: python -m pytest tests/inject/test_inject_oplevel.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quarl.inject import InjectionSpec, attach, inject_ops, select_modules

REL = dict(error_type="relative_gaussian", error_scale=0.05)
BIAS = dict(error_type="systematic_bias", error_scale=0.01)  # deterministic: e(v) = v + 0.01·sign(v)


def _bias(v: torch.Tensor) -> torch.Tensor:
    return v + 0.01 * torch.sign(v)


def test_linear_calls_injected_inside_and_restored_after(llama, ids):
    ref = llama(ids).logits
    linear_before = F.linear
    with inject_ops(InjectionSpec(**REL, injection_point="both"), model=llama) as ops:
        out = llama(ids).logits
    assert not torch.equal(out, ref)
    assert F.linear is linear_before and torch.equal(llama(ids).logits, ref)  # nothing patched, nothing left
    st = ops.stats()
    # 2 blocks x 7 projections; lm_head is a parameter of the model but not selected (default exclusion)
    assert st["linear"]["fires"] == {"unset": 14} and st["linear"]["weight_computations"] == 14
    assert st["linear"]["not_selected"] == 1 and "lm_head" not in st["modules"] and len(st["modules"]) == 14


def test_without_model_needs_explicit_all_ops(llama, ids):
    spec = InjectionSpec(**REL, injection_point="both")
    with pytest.raises(ValueError, match="model=.*all_ops=True"):
        inject_ops(spec)
    with pytest.raises(ValueError, match="not both"):
        inject_ops(spec, model=llama, all_ops=True)
    with inject_ops(spec, all_ops=True) as ops:  # opt-in: every call, lm_head included
        llama(ids)
    assert ops.stats()["linear"]["fires"] == {"unset": 15}


def _record(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    seen, handles = {}, []

    def hook(name: str):
        def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen.setdefault(name, (module, args[0], out))
        return keep

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    return seen, handles


def _untouched(seen: dict) -> dict[str, bool]:
    """Recompute each recorded module outside any injection: equal output <=> nothing was injected into it."""
    return {n: torch.equal(m(x), o) for n, (m, x, o) in seen.items()}


@pytest.mark.parametrize("head", [False, True])
def test_lora_adapters_never_and_lm_head_only_with_opt_in(lora_llama, ids, head):
    names = [n for n, _ in lora_llama.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    head_name = "base_model.model.lm_head"
    seen, handles = _record(lora_llama, names + [head_name])
    spec = InjectionSpec(**REL, injection_point="both", quantize_lm_head=head)
    with torch.no_grad(), inject_ops(spec, model=lora_llama) as ops:
        lora_llama(ids)
    for h in handles:
        h.remove()
    untouched = _untouched(seen)
    assert len(names) == 12 and all(untouched[n] for n in names)  # 2 blocks x 3 targets x (A, B)
    assert untouched[head_name] is (not head)
    st = ops.stats()
    assert set(st["modules"]) == {n for n, _ in select_modules(lora_llama, spec)}
    assert all("lora_" not in n for n in st["modules"]) and (head_name in st["modules"]) is head
    assert any(n.endswith("q_proj.base_layer") for n in st["modules"])  # the frozen base weight is injected
    assert st["linear"]["not_selected"] == 12 + (not head)


def test_target_layers_honoured_at_op_level(llama, ids):
    with inject_ops(InjectionSpec(**REL, target_layers=(1,)), model=llama) as ops:
        llama(ids)
    mods = ops.stats()["modules"]
    assert len(mods) == 7 and all(".layers.1." in n for n in mods)
    assert ops.stats()["linear"]["not_selected"] == 8  # layer 0's 7 projections + lm_head


def test_weight_views_and_keyword_operands_recognised():
    torch.manual_seed(0)
    lin, x = nn.Linear(8, 4, bias=False), torch.randn(3, 8)
    manual = _bias(x) @ _bias(lin.weight.detach()).t()
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with inject_ops(InjectionSpec(**BIAS, injection_point="both"), model=lin) as ops:
        assert torch.equal(x @ lin.weight.t(), manual)  # a transposed view of the weight: e(W) viewed
        assert torch.equal(F.linear(x, weight=lin.weight), F.linear(_bias(x), _bias(lin.weight.detach())))
        assert torch.equal(a @ b, torch.mm(a, b))  # activation x activation: unattributed, left alone
    st = ops.stats()
    assert st["matmul"]["unattributed"] == 2 and st["modules"] == {"": 2}  # the bare root layer's fqn is ''
    assert st["matmul"]["weight_computations"] == 1 and st["linear"]["weight_computations"] == 0  # one cache


def test_exception_inside_context_still_restores():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    ref = lin(x)
    with pytest.raises(RuntimeError, match="boom"):
        with inject_ops(InjectionSpec(**REL, injection_point="input"), model=lin):
            lin(x)
            raise RuntimeError("boom")
    assert torch.equal(lin(x), ref)


def test_matmul_family_injected_as_activations_with_all_ops():
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with inject_ops(InjectionSpec(**REL, injection_point="input"), all_ops=True) as ops:
        outs = [a @ b, torch.matmul(a, b), a.matmul(b), torch.mm(a, b), torch.bmm(a[None], b[None])[0]]
    assert all(not torch.equal(o, a @ b) for o in outs)
    assert ops.stats()["matmul"]["fires"] == {"unset": 5}
    with inject_ops(InjectionSpec(**REL, injection_point="weight"), all_ops=True):
        assert torch.equal(a @ b, torch.mm(a, b))  # matmul operands are not weights


def test_phase_gating_at_op_level():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    ref = lin(x)
    spec = InjectionSpec(**REL, injection_point="input", apply_during="rollout")
    with pytest.raises(ValueError, match="explicit phase"):
        inject_ops(spec, model=lin)
    with inject_ops(spec, model=lin, phase="training") as ops:
        assert torch.equal(lin(x), ref)
    assert ops.stats()["linear"]["skipped"] == {"training": 1}


def test_weight_cached_per_version_and_ste_gradient():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with inject_ops(InjectionSpec(**REL, injection_point="both"), model=lin) as ops:
        for _ in range(3):
            lin(x).sum().backward()
    assert ops.stats()["linear"]["weight_computations"] == 1
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_oplevel_equals_module_level():
    """Same spec on the same model: both levels give the same forward (noise seeded per module and role)."""
    lin, x = nn.Linear(8, 4), torch.randn(2, 8)
    for spec in (InjectionSpec(**BIAS, injection_point="both"), InjectionSpec(**REL, injection_point="both")):
        with inject_ops(spec, model=lin):
            a = lin(x)
        with attach(lin, spec):
            b = lin(x)
        assert torch.equal(a, b)
