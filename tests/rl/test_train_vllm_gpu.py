"""``grpo.use_vllm``: TRL's colocated vLLM generation with the injection attached to vLLM's model (GPU only)."""

import importlib.util

import pytest

from quarl.rl.vllm import vllm_args


def test_vllm_args_use_trl_token_truncate_only_for_tis():
    assert vllm_args(None)["vllm_importance_sampling_correction"] is False
    tis = vllm_args(2.0)
    assert tis["vllm_importance_sampling_mode"] == "token_truncate" and tis["vllm_importance_sampling_cap"] == 2.0
    assert tis["vllm_enable_sleep_mode"] is False and tis["vllm_mode"] == "colocate"


@pytest.mark.gpu
def test_vllm_rollouts_are_injected(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (pip install 'vllm>=0.22,<=0.31' on a CUDA machine)")
    from quarl.rl.run import _build
    from quarl.rl import load_config

    cfg = load_config("injection: {scheme: MXFP4}\naqn: {schedule: constant, sigma_start: 0.01}\n"
                      "grpo: {use_vllm: true, steps: 1, prompts_per_step: 4, generations: 2, max_new_tokens: 32}\n"
                      "eval: {n: 8, batch_size: 8}\n")
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, hooks, _ = _build(cfg, tmp_path, 0)
    trainer.train()
    recorder.close()
    assert hooks.vllm_injector is not None and hooks.vllm_injector.modules
    hooks.vllm_injector.check_fired("rollout")  # vLLM's linears were quantized during generation
    assert hooks.vllm_aqn is not None and hooks.vllm_aqn.applications == 1  # vLLM's own RMSNorm class matched
