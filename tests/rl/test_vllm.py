"""The TRL + vLLM seam without vLLM: every weight sync into the rollout model invalidates its injector's cache.

vLLM's weight loaders write ``param.data.copy_(...)``, which bumps neither ``_version`` nor the data pointer, so
within the rollout injector's one phase a cached quantized weight would be served stale. Here a plain module tree
stands in for vLLM's model and a sync object writes into it exactly that way.
"""

import pytest
import torch

from quarl.inject import InjectionSpec, attach
from quarl.inject.weights import StaleWeightCacheError
from quarl.rl.vllm import invalidate_after_sync


class _Sync:
    """Writes new weights into ``model`` the way vLLM's loaders do (``.data.copy_``), counting the syncs."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def sync_weights(self):
        self.calls += 1
        with torch.no_grad():
            for p in self.model.parameters():
                p.data.copy_(torch.randn_like(p))


def _rollout_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    return model, attach(model, InjectionSpec(scheme="MXFP4"), phase="rollout")


def test_every_weight_sync_invalidates_the_rollout_injector(monkeypatch):
    monkeypatch.setenv("QUARL_VERIFY_WEIGHT_CACHE", "1")  # a stale cache hit raises instead of passing silently
    model, injector = _rollout_model()
    sync = _Sync(model)
    invalidate_after_sync(sync, injector)
    invalidate_after_sync(sync, injector)  # idempotent: one invalidation per sync, not two
    x = torch.randn(4, 64)
    for _ in range(2):
        model(x)  # fills the weight cache
        sync.sync_weights()
        got = model(x)
        fresh_model, fresh = _rollout_model()
        fresh_model.load_state_dict(model.state_dict())
        torch.testing.assert_close(got, fresh_model(x), rtol=0, atol=0)  # e(W_new), bit for bit
        fresh.detach()
    assert sync.calls == 2
    injector.detach()


def test_without_the_invalidation_the_sync_would_serve_a_stale_weight(monkeypatch):
    """The hazard is real: the same sync, unwrapped, leaves the cache stale (caught by the verify mode)."""
    monkeypatch.setenv("QUARL_VERIFY_WEIGHT_CACHE", "1")
    model, injector = _rollout_model()
    x = torch.randn(4, 64)
    model(x)
    _Sync(model).sync_weights()
    with pytest.raises(StaleWeightCacheError):
        model(x)
    injector.detach()


def test_vllm_args_use_trl_token_truncate_only_for_tis():
    from quarl.rl.vllm import vllm_args

    assert vllm_args(None)["vllm_importance_sampling_correction"] is False
    tis = vllm_args(2.0)
    assert tis["vllm_importance_sampling_mode"] == "token_truncate" and tis["vllm_importance_sampling_cap"] == 2.0
    assert tis["vllm_enable_sleep_mode"] is False and tis["vllm_mode"] == "colocate"
