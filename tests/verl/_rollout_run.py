"""The vLLM-side scenario of tests/verl/test_verl_rollout.py, run in a spawned process (vLLM is stubbed there only).

verl's real ``vLLMColocateWorkerExtension`` (through quarl's subclass) drives a module tree that uses vLLM's layer
class names and loads weights the way vLLM's loaders do (``param.data.copy_``). Only the IPC transport
(``BucketedWeightReceiver``: ZMQ + CUDA IPC) is replaced, by one that hands over the test's buckets.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

H, V = 64, 96


class QKVParallelLinear(nn.Module):  # vLLM's class names; forward returns (output, bias) like vLLM's linears
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight), None


class RowParallelLinear(QKVParallelLinear):
    pass


class MergedColumnParallelLinear(QKVParallelLinear):
    pass


class RMSNorm(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n), requires_grad=False)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
        self.qkv_proj, self.o_proj = QKVParallelLinear(H, 3 * H), RowParallelLinear(3 * H, H)
        self.gate_up_proj, self.down_proj = MergedColumnParallelLinear(H, 2 * H), RowParallelLinear(2 * H, H)

    def forward(self, x):
        x = x + self.o_proj(self.qkv_proj(self.input_layernorm(x))[0])[0]
        return x + self.down_proj(self.gate_up_proj(self.post_attention_layernorm(x))[0])[0]


class Qwen2Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer() for _ in range(2)])
        self.norm = RMSNorm(H)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """The shape of vLLM's model: ``load_weights`` writes through ``param.data.copy_`` (no version bump)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.model = Qwen2Model()
        self.lm_head = QKVParallelLinear(H, V)  # excluded by name (lm_head), like vLLM's ParallelLMHead

    def forward(self, x):
        return self.lm_head(self.model(x))[0]

    def compute_logits(self, hidden):
        return hidden

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)
        return set(params)


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = Qwen2ForCausalLM(seed)
    return [(n, p.detach() + 0.01 * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()]


def _worker(ext_cls, eager: bool, buckets: list):
    class Receiver:
        def __init__(self, **kwargs):
            pass

        def receive_weights(self, on_bucket_received):
            for i, bucket in enumerate(buckets[0]):
                on_bucket_received(bucket, is_last=i == len(buckets[0]) - 1)

    import verl.workers.rollout.vllm_rollout.bucketed_weight_transfer as transfer

    transfer.BucketedWeightReceiver = Receiver
    worker = ext_cls.__new__(ext_cls)  # verl's __new__ (its patches), as vLLM's worker construction runs it
    worker.model_runner = SimpleNamespace(
        model=Qwen2ForCausalLM(0),
        vllm_config=SimpleNamespace(model_config=SimpleNamespace(enforce_eager=eager), speculative_config=None,
                                    quant_config=None, parallel_config=None))
    worker.device, worker.local_rank, worker.loras = torch.device("cpu"), 0, []
    worker.add_lora = lambda request: worker.loras.append(request)
    worker.remove_lora = lambda lora_id: None
    return worker


def _norms(model) -> torch.Tensor:
    return torch.cat([p.detach().clone() for n, p in model.named_parameters() if "norm" in n])


def main(index: int, result_path: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _cpu_platform
    import _vllm_stub

    _cpu_platform.install()
    _vllm_stub.install()
    from quarl.inject import attach
    from quarl.noise import AQN
    from quarl.verl.config import load_config
    from quarl.verl.rollout import QuarlWorkerExtension

    out: dict = {}
    cfg = load_config()
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(1))
    buckets: list = [[]]
    try:
        _worker(QuarlWorkerExtension, False, buckets).monkey_patch_model(vocab_size=V)
    except RuntimeError as err:
        out["eager_error"] = str(err)

    w = _worker(QuarlWorkerExtension, True, buckets)
    w.monkey_patch_model(vocab_size=V)
    model, state = w.model_runner.model, w.quarl
    out["injected"], out["aqn_modules"] = state.injector.modules, state.aqn.modules
    w1 = _weights(1)
    buckets[0] = [w1[:7], w1[7:]]  # two buckets, as verl's bucketed transfer sends them
    w.update_weights_from_ipc(peft_config=None, base_sync_done=False)  # sync 0 = verl's global_steps 0
    out["step_after_sync0"] = state.step
    with torch.no_grad():
        y0 = model(x)

    def reference(weights, step, noise: bool):  # a fresh tree, loaded, quarl attached, AQN for ``step``
        ref = Qwen2ForCausalLM(0)
        ref.load_weights(weights)
        inj = attach(ref, cfg.injection, phase="rollout")
        with torch.no_grad():
            if not noise:
                return ref(x), _norms(ref), inj
            with AQN(ref, cfg.aqn, cfg.total_steps).noised(step):
                return ref(x), _norms(ref), inj

    y_ref0, norms0, _ = reference(w1, 0, True)
    out["sync0_equal_reference"] = torch.equal(y0, y_ref0) and torch.equal(_norms(model), norms0)
    out["clean_norms_w1"] = torch.cat([t for n, t in w1 if "norm" in n])
    out["noised_norms_0"] = _norms(model)

    buckets[0] = [[("model.layers.0.qkv_proj.lora_A.weight", torch.zeros(8, H))]]  # a LoRA-only sync (step 1)
    w.update_weights_from_ipc(peft_config={"r": 8}, base_sync_done=True)
    out["lora_synced"] = len(w.loras)
    out["step_after_sync1"] = state.step
    out["noised_norms_1"] = _norms(model)
    y_ref1, norms1, _ = reference(w1, 1, True)
    with torch.no_grad():
        out["sync1_equal_reference"] = torch.equal(model(x), y_ref1) and torch.equal(_norms(model), norms1)

    w.quarl_validation(True)
    out["validation_norms"] = _norms(model)
    y_clean, _, _ = reference(w1, 1, False)
    with torch.no_grad():
        out["validation_equal_clean"] = torch.equal(model(x), y_clean)
    w.quarl_validation(False)
    out["after_validation_norms"] = _norms(model)
    out["stats"] = w.quarl_stats()

    w.quarl_set_step(5)  # the trainer's step (a resumed run): the noise is re-drawn for step 5 from clean weights
    out["step_after_set"] = w.quarl.step
    out["set_step_equal_reference"] = torch.equal(_norms(model), reference(w1, 5, True)[1])
    w.quarl_set_step(1)  # back to the sync count's step: step 1's noise again, exactly
    out["reset_step_equal_sync1"] = torch.equal(_norms(model), out["noised_norms_1"])

    w2 = _weights(2)  # a full sync with new base weights: the cached quantized weights must not be served
    buckets[0] = [w2]
    w.update_weights_from_ipc(peft_config=None, base_sync_done=False)
    y_ref2, _, _ = reference(w2, 2, True)
    with torch.no_grad():
        out["sync2_equal_reference"] = torch.equal(model(x), y_ref2)

    try:
        w.update_verl_delta_weights({})
    except RuntimeError as err:
        out["delta_error"] = str(err)

    silent = _worker(QuarlWorkerExtension, True, buckets)  # hooks that never fire (no forward between syncs)
    silent.monkey_patch_model(vocab_size=V)
    silent.update_weights_from_ipc()
    try:
        silent.update_weights_from_ipc()
    except RuntimeError as err:
        out["never_fired_error"] = str(err)
    torch.save(out, result_path)
