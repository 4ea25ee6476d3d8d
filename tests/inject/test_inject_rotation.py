"""Rotations (``InjectionSpec.rotation``): Hadamard constructions, exactness in full precision, the rotated GEMM.

Run: python -m pytest tests/inject/test_inject_rotation.py -q
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from quarl.formats import fake_quantize, get_format
from quarl.inject import InjectionSpec, attach, select_modules
from quarl.inject.rotation import Rotation, hadamard, module_rotations

# a lossless error model: zeroes only |v| < 1e-30 max|v|, which no fp32 weight or activation here has
LOSSLESS = dict(error_type="deadzone", error_scale=1e-30, injection_point="both")


def _llama(hidden=96, seed=0):
    """hidden 96 = 12 * 8 (a Kronecker with Paley's H12), MLP 256 = 2^8, head_dim 32: every rotation case."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
                      num_key_value_heads=3, head_dim=32, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 44, 48, 60, 96, 160, 576, 1024])
def test_hadamard_matrices_are_orthogonal(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))  # entries +-1
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # integer arithmetic: exact


@pytest.mark.parametrize("n", [3, 5, 6, 9, 10, 18, 90])
def test_unknown_hadamard_order_raises_naming_it(n):
    with pytest.raises(ValueError, match=rf"order {n}\b"):
        hadamard(n)


@pytest.mark.parametrize("features,block", [(64, 16), (96, 32), (96, 96), (256, 256), (576, 576), (1536, 1536)])
def test_fast_rotation_is_the_dense_randomized_hadamard(features, block):
    """Blocks above 64 run as H_p X H_m with a fast Walsh-Hadamard transform: it must be diag(s) H_b / sqrt(b)."""
    signs = torch.randint(0, 2, (features,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = Rotation(features, block, signs).dense().double()
    dense = torch.block_diag(*[hadamard(block)] * (features // block)) / block ** 0.5
    # fp32 sums of b terms of size 1/sqrt(b): a few ulp of 1/sqrt(b) per entry
    assert torch.allclose(r, signs.double().unsqueeze(1) * dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("features,block", [(64, 16), (96, 32), (96, 96), (256, 256), (576, 576)])
def test_rotation_is_orthogonal(features, block):
    signs = torch.randint(0, 2, (features,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    r = Rotation(features, block, signs).dense().double()
    # fp32 entries +-1/sqrt(b) (exact for b = 16, 64, 256; 1/sqrt(32), 1/sqrt(96) rounded): R R^T = I within the
    # relative rounding of the entries, 2^-24 per entry, over b terms
    assert torch.allclose(r @ r.T, torch.eye(features, dtype=torch.float64), rtol=0, atol=block * 2 ** -23)
    if block == 16:
        assert torch.equal(r @ r.T, torch.eye(features, dtype=torch.float64))


def test_rotation_round_trip_and_seeding():
    model = _llama()
    spec = InjectionSpec(scheme="W4A4", rotation="block")
    selected = select_modules(model, spec)
    errors = lambda fqn: type("E", (), {"fmt": get_format("mxfp4"), "name": "mxfp4"})()  # noqa: E731
    a = module_rotations(spec, selected, errors)
    b = module_rotations(spec, selected, errors)
    c = module_rotations(spec.replace(seed=1), selected, errors)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert torch.equal(a[q].signs, b[q].signs)  # same seed, same module: same rotation
    assert not torch.equal(a[q].signs, a[k].signs)  # per module
    assert not torch.equal(a[q].signs, c[q].signs)  # per seed
    assert a[q].block == 32 and a["model.layers.0.mlp.down_proj"].features == 256
    x = torch.randn(5, 96)
    # x R R^T = x to fp32 rounding: |x| ~ 3 at most, two products of 32 terms, each rounding 2^-24 relative
    assert torch.allclose(a[q].unrotate(a[q].rotate(x)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rotation", ["block", "full"])
def test_rotated_model_is_the_plain_model_in_full_precision(rotation):
    """Every linear's weight and input rotated and rotated back (x R R^T, W R R^T, with the per-module rotations
    the injector builds): the logits are the plain model's to fp32 rounding."""
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    spec = InjectionSpec(scheme="W4A4", rotation=rotation)
    selected = select_modules(model, spec)
    rots = module_rotations(spec, selected, lambda fqn: type("E", (), {"fmt": get_format("mxfp4")})())
    handles = []
    with torch.no_grad():
        for fqn, module in selected:
            rot = rots[fqn]
            module.weight.copy_(rot.unrotate(rot.rotate(module.weight)))
            handles.append(module.register_forward_pre_hook(lambda m, a, r=rot: (r.unrotate(r.rotate(a[0])),)))
        out = model(ids).logits
    for h in handles:
        h.remove()
    # logits are O(1); each rotated operand carries about 2 * 2^-24 * sqrt(K) relative rounding (K <= 256), and
    # two decoder blocks compound it: 1e-5 absolute is about 25x the observed 4e-7 (logits up to 0.6)
    assert torch.allclose(out, ref, rtol=0, atol=1e-5), (out - ref).abs().max()


def test_full_rotation_with_a_lossless_error_matches_the_plain_model():
    """The injector path end to end (weight cache, input hooks) with a lossless error: plain logits."""
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with attach(model, InjectionSpec(**LOSSLESS, rotation="full")) as inj:
            out = model(ids).logits
            assert len(inj.modules) == 14
    # as above: fp32 rounding of the rotations (K = 96 via H12 (x) H8, K = 256), not of any error model
    assert torch.allclose(out, ref, rtol=0, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("scheme,rotation,features", [("MXFP4", "block", 96), ("NVFP4", "block", 96),
                                                      ("MXFP4", "full", 96), ("NVFP4", "full", 64)])
def test_injected_linear_computes_the_rotated_gemm(scheme, rotation, features):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, 48))
    x = torch.randn(4, 7, features) * torch.linspace(0.1, 8.0, features)  # outlier channels: rotation matters
    spec = InjectionSpec(scheme=scheme, rotation=rotation)
    fmt = get_format(spec.error_type)
    rot = module_rotations(spec, [("0", model[0])], lambda fqn: type("E", (), {"fmt": fmt})())["0"]
    w, b = model[0].weight.detach(), model[0].bias.detach()
    qx, qw = fake_quantize(rot.rotate(x), fmt), fake_quantize(rot.rotate(w), fmt)  # Q(xR), Q(WR)
    with torch.no_grad(), attach(model, spec) as inj:
        y = model(x)
        y2 = model(x)
        stats = inj.stats()["0"]
    # bit for bit: the linear runs on e_R(x) = Q(xR) R^T and the cached e_R(W) = Q(WR) R^T
    assert torch.equal(y, F.linear(rot.unrotate(qx), rot.unrotate(qw), b))
    assert torch.equal(y, y2) and stats["weight_computations"] == 1  # the rotated W is cached, not per forward
    # = Q(xR) Q(WR)^T + b up to the fp32 rounding of R^T R (|y| ~ 50 here; 2^-24 relative over K terms, x 2)
    assert torch.allclose(y, qx @ qw.T + b, rtol=0, atol=1e-3)
    assert not torch.allclose(qx, rot.rotate(x), atol=1e-3)  # the format did quantize
    # and the rotation changed what was quantized
    with torch.no_grad(), attach(model, InjectionSpec(scheme=scheme)):
        plain = model(x)
    assert not torch.equal(y, plain)


def test_rotation_keeps_the_straight_through_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 32))
    x = torch.randn(3, 96, requires_grad=True)
    spec = InjectionSpec(scheme="MXFP4", rotation="full")
    fmt = get_format("mxfp4")
    rot = module_rotations(spec, [("0", model[0])], lambda fqn: type("E", (), {"fmt": fmt})())["0"]
    w_eff = rot.unrotate(fake_quantize(rot.rotate(model[0].weight.detach()), fmt))  # e_R(W)
    with attach(model, spec):
        model(x).sum().backward()
    # dL/dx = g e_R(W) R R^T = g e_R(W): STE through Q, R R^T = I to fp32 rounding (|g e_R(W)| ~ 1)
    assert torch.allclose(x.grad, torch.ones(3, 32) @ w_eff, rtol=0, atol=1e-5)
    # the weight's STE gradient: identity through e_R (dL/dW = g^T e_R(x), finite and present)
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_rotation_spec_validation():
    with pytest.raises(ValueError, match="'full'"):
        InjectionSpec(scheme="W4A4", rotation="ful")  # nearest valid value
    with pytest.raises(ValueError, match="output"):
        InjectionSpec(error_type="mxfp4", injection_point="output", rotation="block")
    with pytest.raises(ValueError, match="block format"):
        InjectionSpec(scheme="FP8", rotation="block")
    with pytest.raises(ValueError, match="no blocks"):
        InjectionSpec(error_type="relative_gaussian", error_scale=0.1, rotation="block")
    with pytest.raises(ValueError, match="rotate twice"):
        InjectionSpec(scheme="NVFP4", format_options={"hadamard": True}, rotation="block")
    spec = InjectionSpec(scheme="NVFP4", rotation="full")
    assert InjectionSpec.from_yaml(spec.to_yaml()) == spec


@pytest.mark.parametrize("features,rotation,match", [(18, "full", "order 18"), (40, "block", "multiple")])
def test_unsupported_input_dimension_raises_at_attach(features, rotation, match):
    model = nn.Sequential(nn.Linear(features, 8))
    with pytest.raises(ValueError, match=match) as info:
        attach(model, InjectionSpec(scheme="MXFP4", rotation=rotation))
    assert "0" in str(info.value)  # the module is named


def test_fused_moe_experts_are_refused_by_name():
    from _tiny_moe import tiny_moe

    with pytest.raises(ValueError, match=r"experts.*2-D weight"):
        attach(tiny_moe("qwen2_moe"), InjectionSpec(scheme="MXFP4", rotation="block"))


def test_static_input_scales_and_operator_level_injection_are_refused():
    with pytest.raises(ValueError, match="unrotated"):
        InjectionSpec(scheme="NVFP4", input_scale="static", input_amax={"0": 1.0}, rotation="full")
    from quarl.inject import inject_ops

    model = nn.Sequential(nn.Linear(32, 8))
    with pytest.raises(ValueError, match="rotation or a precision plan"):
        inject_ops(InjectionSpec(scheme="MXFP4", rotation="block"), model=model)


@pytest.mark.parametrize("rotation", ["block", "full"])
def test_bf16_operands_rotate_in_fp32_and_come_back_in_bf16(rotation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 16)).to(torch.bfloat16)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    with attach(model, InjectionSpec(scheme="MXFP4", rotation=rotation)) as inj:
        y = model(x)
        y.float().sum().backward()
        weight_sqnr = inj.stats()["0"]["weight"]["sqnr_db"]
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert 10 < weight_sqnr < 30  # a 4-bit weight error measured in the original basis (orthogonal R keeps norms)
