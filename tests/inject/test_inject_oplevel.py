"""Operator-level injection: F.linear / matmul calls are injected only inside the context, never after.

Run: python -m pytest tests/inject/test_inject_oplevel.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quarl.inject import InjectionSpec, attach, inject_ops

REL = dict(error_type="relative_gaussian", error_scale=0.05)


def test_linear_calls_injected_inside_and_restored_after(llama, ids):
    ref = llama(ids).logits
    linear_before = F.linear
    with inject_ops(InjectionSpec(**REL, injection_point="both")) as ops:
        out = llama(ids).logits
    assert not torch.equal(out, ref)
    assert F.linear is linear_before and torch.equal(llama(ids).logits, ref)  # nothing patched, nothing left
    st = ops.stats()["linear"]
    # 2 blocks x 7 projections + lm_head (op level has no module names, so no head exclusion)
    assert st["fires"] == {"unset": 15} and st["weight_computations"] == 15


def test_exception_inside_context_still_restores():
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    ref = lin(x)
    with pytest.raises(RuntimeError, match="boom"):
        with inject_ops(InjectionSpec(**REL, injection_point="input")):
            lin(x)
            raise RuntimeError("boom")
    assert torch.equal(lin(x), ref)


def test_matmul_family_injected_as_activations():
    a, b = torch.randn(3, 8), torch.randn(8, 5)
    with inject_ops(InjectionSpec(**REL, injection_point="input")) as ops:
        outs = [a @ b, torch.matmul(a, b), a.matmul(b), torch.mm(a, b), torch.bmm(a[None], b[None])[0]]
    assert all(not torch.equal(o, a @ b) for o in outs)
    assert ops.stats()["matmul"]["fires"] == {"unset": 5}
    with inject_ops(InjectionSpec(**REL, injection_point="weight")):
        assert torch.equal(a @ b, torch.mm(a, b))  # matmul operands are not weights


def test_phase_gating_at_op_level():
    lin, x = nn.Linear(4, 4), torch.randn(2, 4)
    ref = lin(x)
    spec = InjectionSpec(**REL, injection_point="input", apply_during="rollout")
    with pytest.raises(ValueError, match="explicit phase"):
        inject_ops(spec)
    with inject_ops(spec, phase="training") as ops:
        assert torch.equal(lin(x), ref)
    assert ops.stats()["linear"]["skipped"] == {"training": 1}


def test_weight_cached_per_version_and_ste_gradient():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with inject_ops(InjectionSpec(**REL, injection_point="both")) as ops:
        for _ in range(3):
            lin(x).sum().backward()
    assert ops.stats()["linear"]["weight_computations"] == 1
    assert lin.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_oplevel_weight_equals_module_level_weight():
    """Same spec, same seed-independent model (systematic bias): both levels give the same forward."""
    lin, x = nn.Linear(8, 4), torch.randn(2, 8)
    spec = InjectionSpec(error_type="systematic_bias", error_scale=0.01, injection_point="both")
    with inject_ops(spec):
        a = lin(x)
    with attach(lin, spec):
        b = lin(x)
    assert torch.equal(a, b)
