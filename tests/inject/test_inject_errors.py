"""Error models: the math of each noise model, seeding, and gradient semantics (STE vs cut).

Run: python -m pytest tests/inject/test_inject_errors.py -q
"""

import math

import pytest
import torch

from quarl.inject.errors import (
    ErrorModel, absolute_gaussian, deadzone, module_seed, pass_through, relative_gaussian, systematic_bias,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_relative_gaussian_is_multiplicative_with_unit_scale_std():
    x = torch.full((200_000,), 2.0)
    y = relative_gaussian(x, 0.1, _gen())
    ratio = y / x - 1  # = 0.1 * N(0,1)
    # n = 2e5 samples: std of the sample mean is 0.1/sqrt(n) ~ 2.2e-4 -> 5 sigma = 1.2e-3; sample std's std ~ 1.6e-4
    assert abs(ratio.mean().item()) < 1.2e-3
    assert abs(ratio.std().item() - 0.1) < 1e-3


def test_absolute_gaussian_is_additive():
    x = torch.zeros(200_000)
    y = absolute_gaussian(x, 0.5, _gen())
    assert abs(y.mean().item()) < 5 * 0.5 / math.sqrt(2e5)
    assert abs(y.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * 2e5)


def test_systematic_bias_pushes_away_from_zero():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert torch.equal(systematic_bias(x, 0.25), torch.tensor([-2.25, -0.75, 0.0, 0.75, 2.25]))


def test_deadzone_zeroes_below_fraction_of_max():
    x = torch.tensor([-4.0, -0.39, 0.4, 0.41, 1.0])  # threshold 0.1 * 4 = 0.4: |x| < 0.4 -> 0
    assert torch.equal(deadzone(x, 0.1), torch.tensor([-4.0, 0.0, 0.4, 0.41, 1.0]))


def test_noise_is_seeded_and_dtype_preserved():
    x = torch.randn(64, dtype=torch.bfloat16)
    a = relative_gaussian(x, 0.1, _gen(3))
    b = relative_gaussian(x, 0.1, _gen(3))
    c = relative_gaussian(x, 0.1, _gen(4))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)


def test_module_seed_is_stable_and_distinct():
    assert module_seed(0, "a.q_proj") == module_seed(0, "a.q_proj")
    assert module_seed(0, "a.q_proj") != module_seed(1, "a.q_proj")
    assert module_seed(0, "a.q_proj") != module_seed(0, "a.k_proj")


def test_pass_through_forward_value_and_identity_grad():
    x = torch.randn(5, requires_grad=True)
    y = torch.randn(5)
    z = pass_through(x, y)
    assert torch.equal(z, y)
    (z * torch.arange(5.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(5.0))
    assert y.grad_fn is None  # the cached tensor itself is never made part of a graph


@pytest.mark.parametrize("name,scale", [("relative_gaussian", 0.1), ("deadzone", 0.2), ("systematic_bias", 0.01)])
def test_error_model_ste_vs_cut(name, scale):
    x = torch.randn(4, 8, requires_grad=True)
    ste = ErrorModel(name, scale, None, use_ste=True)
    cut = ErrorModel(name, scale, None, use_ste=False)
    ste(x, _gen()).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # d sum(e(x)) / dx = 1 under the STE
    y = cut(x, _gen())
    assert not y.requires_grad and y.grad_fn is None  # the no-STE path is cut: no gradient can flow
