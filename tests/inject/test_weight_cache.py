"""The weight cache never serves a stale quantized weight: every write path, the verify mode, the checksum.

Run: pytest tests/inject/test_weight_cache.py
(The test suite runs with QUARL_VERIFY_WEIGHT_CACHE=1, set in tests/conftest.py; tests that need it off say so.)
"""

import copy
import os
import socket

import pytest
import torch
from torch import nn

from quarl.inject import InjectionSpec, attach, inject_ops
from quarl.inject.weights import VERIFY_ENV, StaleWeightCacheError, checksum, same_bits

SPEC = InjectionSpec(scheme="MXFP4A16")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))


def _fresh_output(model: nn.Module, x: torch.Tensor, spec: InjectionSpec = SPEC) -> torch.Tensor:
    """What a newly attached injector computes on ``model``'s current weights."""
    clone = copy.deepcopy(model)
    with attach(clone, spec):
        return clone(x)


def _write_through_data(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(torch.randn(p.shape, generator=g) * 3)  # bumps neither _version nor data_ptr


def test_the_suite_runs_in_verify_mode():
    assert os.environ.get(VERIFY_ENV) == "1"


def test_data_copy_inside_a_phase_raises_in_verify_mode():
    model, x = _mlp(), torch.randn(4, 64)
    inj = attach(model, SPEC)
    model(x)
    _write_through_data(model)
    with pytest.raises(StaleWeightCacheError, match=r"cached quantized weight of 0 is stale.*invalidate_weights"):
        model(x)


def test_data_copy_without_verify_is_stale_until_invalidated(monkeypatch):
    """The reproduction: without verify mode and without a phase change, `.data.copy_` is invisible to the key;
    `invalidate_weights()` is the documented fix, and then the output is exactly a fresh injector's."""
    monkeypatch.delenv(VERIFY_ENV)
    model, x = _mlp(), torch.randn(4, 64)
    inj = attach(model, SPEC)
    model(x)
    _write_through_data(model)
    stale = model(x)
    fresh = _fresh_output(model, x)
    assert (stale - fresh).abs().max() > 1.0  # served from the cache: the reproduction
    inj.invalidate_weights()
    assert torch.equal(model(x), fresh)


def test_data_copy_between_phases_is_caught_without_any_call():
    model, x = _mlp(), torch.randn(4, 64)
    inj = attach(model, InjectionSpec(scheme="MXFP4A16", apply_during="both"))
    with inj.phase("rollout"):
        model(x)
    _write_through_data(model)
    with inj.phase("training"):
        out = model(x)
    assert torch.equal(out, _fresh_output(model, x))
    assert inj.stats()["0"]["weight_computations"] == 2


def test_a_phase_change_requantizes_a_format_once_and_keeps_a_random_draw():
    model, x = _mlp(), torch.randn(4, 64)
    inj = attach(model, InjectionSpec(scheme="MXFP4A16", apply_during="both"))
    for phase in ("rollout", "rollout", "training"):
        inj.set_phase(phase)
        model(x)
        model(x)
    assert inj.stats()["0"]["weight_computations"] == 2  # once per phase, never per forward
    noisy = attach(_mlp(), InjectionSpec(error_type="relative_gaussian", error_scale=0.05,
                                         injection_point="weight", apply_during="both"))
    m = noisy.model
    with noisy.phase("rollout"):
        y = m(x)
    with noisy.phase("training"):
        assert torch.equal(m(x), y)  # the checksum proved the weight unchanged: same draw
    assert noisy.stats()["0"]["weight_computations"] == 1
    _write_through_data(m)
    with noisy.phase("rollout"):
        m(x)
    assert noisy.stats()["0"]["weight_computations"] == 2


def test_load_state_dict():
    model, x = _mlp(), torch.randn(4, 64)
    attach(model, SPEC)
    model(x)
    model.load_state_dict(_mlp(seed=5).state_dict())
    assert torch.equal(model(x), _fresh_output(model, x))


@pytest.mark.parametrize("use_ste", [True])
def test_optimizer_step_on_trainable_weights(use_ste):
    model, x = _mlp(), torch.randn(8, 64)
    inj = attach(model, InjectionSpec(scheme="MXFP4A16", use_ste=use_ste))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            assert torch.equal(model(x), _fresh_output(model, x))
    assert inj.stats()["0"]["weight_computations"] == 4


class _DataWritingSGD(torch.optim.Optimizer):
    """An optimizer that writes through ``.data`` (as FSDP2's gather into a reused buffer looks to the hooks)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data.copy_(p.data - group["lr"] * p.grad)


def test_optimizer_step_that_bumps_no_version_is_caught_by_the_step_hook():
    model, x = _mlp(), torch.randn(8, 64)
    attach(model, SPEC)
    opt = _DataWritingSGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions  # the write is invisible to the key
    with torch.no_grad():
        assert torch.equal(model(x), _fresh_output(model, x))


def test_detach_removes_the_optimizer_hook():
    model, x = _mlp(), torch.randn(8, 64)
    inj = attach(model, SPEC)
    inj.detach()
    assert not inj.attached
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    before = inj._epoch.value
    opt.step()
    assert inj._epoch.value == before


def test_peft_merge_and_unmerge():
    peft = pytest.importorskip("peft")
    model, x = _mlp(), torch.randn(4, 64)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    inj = attach(lora, SPEC)
    assert all(m.endswith("base_layer") for m in inj.modules)
    y_unmerged = lora(x)
    lora.merge_adapter()  # base weights += B·A through .data, adapters bypassed
    merged = lora(x)
    base = lora.get_base_model()
    for name in ("0", "2"):  # a fresh injector on the merged base weights, adapters off
        assert torch.equal(inj._modules[f"base_model.model.{name}.base_layer"].weight._value,
                           _fresh_weight(base.get_submodule(name).base_layer.weight))
    lora.unmerge_adapter()
    assert not torch.equal(merged, y_unmerged)
    again = lora(x)
    for name in ("0", "2"):
        assert torch.equal(inj._modules[f"base_model.model.{name}.base_layer"].weight._value,
                           _fresh_weight(base.get_submodule(name).base_layer.weight))
    assert again.shape == y_unmerged.shape


def _fresh_weight(w: torch.Tensor) -> torch.Tensor:
    from quarl.formats import fake_quantize, get_format

    return fake_quantize(w.detach(), get_format("mxfp4"))


def test_oplevel_cache_verify_and_invalidate():
    model, x = _mlp(), torch.randn(4, 64)
    with inject_ops(SPEC, model=model) as ops:
        model(x)
        _write_through_data(model)
        with pytest.raises(StaleWeightCacheError):
            model(x)
        ops.invalidate_weights()
        out = model(x)
    with inject_ops(SPEC, model=model):
        assert torch.equal(out, model(x))


def test_checksum_sees_every_single_bit():
    w = torch.randn(32, 48)
    base = checksum(w)
    for idx in [(0, 0), (31, 47), (7, 13)]:
        v = w.clone()
        v[idx] = torch.nextafter(v[idx], torch.tensor(float("inf")))  # one ulp
        assert checksum(v) != base
    z = torch.zeros(4, 4)
    nz = z.clone()
    nz[1, 2] = -0.0
    assert checksum(z) != checksum(nz) and not same_bits(z, nz) and torch.equal(z, nz)
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1], w[0, 0]  # a permutation keeps a plain sum, not this one
    assert checksum(swapped) != base
    assert checksum(w.to(torch.bfloat16)) == checksum(w.to(torch.bfloat16).clone())


# --- FSDP2, 2 gloo ranks ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _mlp()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        inj = attach(model, InjectionSpec(scheme="MXFP4A16", use_ste=True))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
        losses = []
        for _ in range(4):
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out[rank] = (losses, inj.stats()["0"]["weight_computations"])
    finally:
        dist.destroy_process_group()


def _reference_losses() -> list[float]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(4):
        with attach(model, InjectionSpec(scheme="MXFP4A16", use_ste=True)):  # a fresh cache every step
            loss = model(x).square().mean()
            loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_fsdp2_two_ranks_trainable_weights_never_stale():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ref = _reference_losses()
    for rank in (0, 1):
        losses, computations = out[rank]
        assert losses == pytest.approx(ref, rel=1e-5, abs=1e-6)  # gloo all-reduce order: fp32 rounding only
        assert computations >= 4  # re-quantized after every step


def test_cache_weights_false_stores_nothing_and_is_always_fresh(monkeypatch):
    monkeypatch.delenv(VERIFY_ENV)
    model, x = _mlp(), torch.randn(4, 64)
    inj = attach(model, SPEC, cache_weights=False)
    model(x)
    assert all(s.weight._value is None for s in inj._modules.values())
    _write_through_data(model)
    assert torch.equal(model(x), _fresh_output(model, x))  # no invalidation needed: nothing was kept
    assert inj.stats()["0"]["weight_computations"] == 2


def test_cache_weights_false_reaches_moe_experts():
    from _tiny_moe import tiny_moe

    model = tiny_moe("qwen3_moe")
    ids = torch.randint(0, 128, (1, 6))
    inj = attach(model, SPEC, cache_weights=False)
    with torch.no_grad():
        model(input_ids=ids)
    experts = [s.weight for s in inj._modules.values() if hasattr(s.weight, "caches")]
    assert experts and all(c._value is None for e in experts for c in e.caches.values())
