"""AQN on sharded weights: FSDP2 (DTensor) at world size 1 and 2 on CPU (gloo), and vLLM-style TP slices.

Run: pytest tests/noise/test_aqn_sharded.py

The noise of a module is drawn at full size from its seed and each rank keeps its shard, so the gathered noised
weights -- and the logits computed from them -- must be bit-identical at world size 1, 2 and unsharded.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_models import tiny_llama
from torch import nn

from quarl.noise import AQN, AQNConfig

CONFIGS = {
    "norm": AQNConfig(schedule="constant", sigma_start=0.05, seed=3),
    "linear_relative": AQNConfig(schedule="constant", sigma_start=0.05, seed=3, target="linear",
                                 target_classes=("Linear",), relative=True),
}
IDS = torch.arange(24).reshape(2, 12) % 128


def _gather(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _noised_views(model: nn.Module) -> dict:
    """For each config: the gathered weights inside ``noised(3)``, the logits there, and the weights after."""
    out = {}
    for name, cfg in CONFIGS.items():
        aqn = AQN(model, cfg, total_steps=10)
        with torch.no_grad(), aqn.noised(3) as stats:
            noised = _gather(model)
            logits = model(IDS).logits.clone()
        with torch.no_grad():
            logits_after = model(IDS).logits.clone()  # the forward after the block sees clean weights again
        out[name] = {"noised": noised, "logits": logits, "after": _gather(model), "modules": aqn.modules,
                     "logits_after": logits_after,
                     "noise_norm": stats["aqn/noise_norm"], "count": stats["aqn/modules"]}
    return out


def _fsdp_worker(rank: int, world: int, store: str, result: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = tiny_llama(seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        views = _noised_views(model)
        if rank == 0:
            torch.save(views, result)
    finally:
        dist.destroy_process_group()


def _run_fsdp(world: int, tmp_path) -> dict:
    result = tmp_path / f"ws{world}.pt"
    mp.start_processes(_fsdp_worker, args=(world, str(tmp_path / f"store{world}"), str(result)), nprocs=world,
                       join=True, start_method="spawn")
    return torch.load(result)


def test_fsdp2_noise_is_independent_of_world_size(tmp_path):
    plain_model = tiny_llama(seed=0)
    clean = {n: p.detach().clone() for n, p in plain_model.named_parameters()}
    plain = _noised_views(plain_model)
    ws1, ws2 = _run_fsdp(1, tmp_path), _run_fsdp(2, tmp_path)
    for name in CONFIGS:
        ref = plain[name]
        assert ref["count"] == len(ref["modules"]) > 0
        changed = [n for n in clean if not torch.equal(clean[n], ref["noised"][n])]
        assert changed and all(n.removesuffix(".weight") in ref["modules"] for n in changed)
        for got in (ws1[name], ws2[name]):
            assert got["modules"] == ref["modules"] and got["count"] == ref["count"]
            for n in clean:  # the same noised weights, bit for bit, at every world size
                assert torch.equal(got["noised"][n], ref["noised"][n]), (name, n)
                assert torch.equal(got["after"][n], clean[n]), (name, n)  # restored exactly
            # logits: the same weights, but FSDP2 runs the matmuls on gathered copies; allow float reassociation
            torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=0)
            torch.testing.assert_close(got["logits_after"], ref["logits_after"], atol=1e-5, rtol=0)
            assert (got["logits"] - got["logits_after"]).abs().max() > 1e-3  # the noise did reach the forward
            assert got["noise_norm"] == pytest.approx(ref["noise_norm"], rel=1e-6)  # reduced in another order


class ColumnParallelLinear(nn.Module):  # vLLM's class names, holding one TP rank's slice
    def __init__(self, weight: torch.Tensor, tp_rank: int, tp_size: int, dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(weight.chunk(tp_size, dim=dim)[tp_rank].clone())


class RowParallelLinear(ColumnParallelLinear):
    pass


class _TPModel(nn.Module):
    def __init__(self, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int):
        super().__init__()
        self.up_proj = ColumnParallelLinear(full["up"], tp_rank, tp_size, dim=0)
        self.down_proj = RowParallelLinear(full["down"], tp_rank, tp_size, dim=1)


def test_vllm_tp_slices_see_the_slices_of_the_tp1_noise():
    torch.manual_seed(0)
    full = {"up": torch.randn(16, 8), "down": torch.randn(8, 16)}
    cfg = AQNConfig(schedule="constant", sigma_start=0.1, target="linear", target_classes=("*ParallelLinear",))

    def noised(tp_rank, tp_size):
        model = _TPModel(full, tp_rank, tp_size)
        with AQN(model, cfg, total_steps=4).noised(1):
            return model.up_proj.weight.detach().clone(), model.down_proj.weight.detach().clone()

    up1, down1 = noised(0, 1)
    shards = [noised(r, 2) for r in range(2)]
    assert not torch.equal(up1, full["up"])
    assert torch.equal(torch.cat([s[0] for s in shards], dim=0), up1)
    assert torch.equal(torch.cat([s[1] for s in shards], dim=1), down1)
