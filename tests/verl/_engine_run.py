"""One rank of the verl-engine tests (spawned by tests/verl/test_verl_engine.py; not a test module).

Builds verl 0.9.1's real FSDP2 engine on the CPU platform with ``external_lib=quarl.verl``, runs ``infer_batch`` and
one ``train_batch``, and saves what the parent compares: log-probs before and after the step, the gathered LoRA
weights before and after, the engine class, the hooked module names, the config digest and verl's metrics.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

B, P, R = 4, 6, 5  # sequences, prompt length (left padded), response length (right padded)
LR = 1e-2


def batch(vocab: int) -> dict[str, torch.Tensor]:
    """A fixed left/right padded batch: (B, P+R) ids, masks, position ids, advantages."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, P + R), generator=g)
    attn = torch.ones(B, P + R, dtype=torch.long)
    attn[0, :2] = 0  # left padding of two prompts
    attn[2, :1] = 0
    attn[1, P + 3:] = 0  # right padding of two responses
    attn[3, P + 4:] = 0
    ids = ids * attn
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    adv = torch.linspace(-1.0, 1.0, B).unsqueeze(-1).expand(B, R).contiguous()
    return {"input_ids": ids, "attention_mask": attn, "position_ids": pos, "response_mask": attn[:, P:].clone(),
            "advantages": adv}


def to_engine(data: dict[str, torch.Tensor]):
    """verl's no-padding TensorDict with the keys its engine reads (as its trainer builds it)."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = TensorDict({k: v.clone() for k, v in data.items()}, batch_size=[B])
    td["responses"] = td["input_ids"][:, P:]
    td["prompts"] = td["input_ids"][:, :P]
    td = left_right_2_no_padding(td)
    tu.assign_non_tensor(td, temperature=1.0, use_remove_padding=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=B, use_fused_kernels=False, calculate_entropy=False,
                         global_batch_size=B)
    return td


def pg_loss(model_output, data, dp_group=None):
    """-sum(adv * logp) / global response tokens * dp_size: verl's normalization, so dp ranks average to it."""
    from verl.workers.utils.padding import no_padding_2_padding

    logp = no_padding_2_padding(model_output["log_probs"], data)  # (B, R)
    mask = data["response_mask"].to(logp.dtype)
    loss = -(logp * mask * data["advantages"]).sum() / data["batch_num_tokens"] * data["dp_size"]
    return loss, {"pg_loss": loss.detach().item()}


def logprobs(engine, data) -> torch.Tensor:
    from verl.workers.utils.padding import no_padding_2_padding

    td = to_engine(data)
    with engine.eval_mode():
        out = engine.infer_batch(td)
    return no_padding_2_padding(out["model_output"]["log_probs"], td).detach().clone()


def lora_state(module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in module.named_parameters() if "lora_" in n}


def build(model_dir: str, forward_only: bool, lora_rank: int):
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.trainer.config import CheckpointConfig
    from verl.workers.engine.base import EngineRegistry

    model_config = HFModelConfig(path=model_dir, external_lib="quarl.verl", load_tokenizer=False,
                                 override_config={"attn_implementation": "sdpa"}, lora_rank=lora_rank,
                                 lora_alpha=16, enable_gradient_checkpointing=False, use_remove_padding=True)
    engine_config = FSDPEngineConfig(strategy="fsdp2", use_torch_compile=False, forward_only=forward_only,
                                     model_dtype="fp32", mixed_precision={"param_dtype": "fp32",
                                     "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    optim = FSDPOptimizerConfig(lr=LR, weight_decay=0.0, clip_grad=1e9)
    engine = EngineRegistry.new("language_model", "fsdp2", model_config, engine_config, optim, CheckpointConfig())
    engine.initialize()
    return engine


def _unpinned_offload() -> None:
    """verl always gives the reference engine ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator,
    so on the CPU platform the same policy is built unpinned (the only change to verl's engine in these tests)."""
    from verl.workers.engine.fsdp import transformer_impl

    class Unpinned(transformer_impl.CPUOffloadPolicy):
        def __init__(self, pin_memory: bool = True) -> None:
            super().__init__(pin_memory=False)

    transformer_impl.CPUOffloadPolicy = Unpinned


def main(rank: int, world: int, workdir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _cpu_platform

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store{world}", rank=rank, world_size=world)
    try:
        _cpu_platform.install()
        loaded_before = "quarl.verl" in sys.modules
        engine = build(os.path.join(workdir, "model"), forward_only=False, lora_rank=8)
        data = batch(128)
        lp0 = logprobs(engine, data)
        lora0 = lora_state(engine.module)
        with engine.train_mode():
            out = engine.train_batch(to_engine(data), loss_function=pg_loss)
        lp1 = logprobs(engine, data)
        inj = engine.quarl_injector
        _unpinned_offload()
        ref = build(os.path.join(workdir, "model"), forward_only=True, lora_rank=0)
        digests = [None] * world
        dist.all_gather_object(digests, engine.quarl_config.digest())
        cache = {fqn: m.weight._value for fqn, m in inj._modules.items() if m.weight._value is not None}
        result = {"cache_bytes": sum(v.numel() * v.element_size() for v in cache.values()),
                  "cache_numel": {fqn: v.numel() for fqn, v in cache.items()},
                  "shard_bytes": sum(p.to_local().numel() * p.element_size() for p in engine.module.parameters()),
                  "engine": type(engine).__qualname__, "loaded_before": loaded_before, "lp0": lp0, "lp1": lp1,
                  "lora0": lora0, "lora1": lora_state(engine.module), "hooked": inj.modules,
                  "metrics": dict(out["metrics"]), "digests": digests,
                  "ref_engine": type(ref).__qualname__, "ref_hooked": ref.quarl_injector.modules,
                  "ref_lp": logprobs(ref, data)}
        torch.save(result, os.path.join(workdir, f"ws{world}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
