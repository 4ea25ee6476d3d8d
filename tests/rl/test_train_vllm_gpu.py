"""``grpo.use_vllm``: TRL's colocated vLLM generation with the injection attached to vLLM's model (GPU only)."""

import importlib.util

import pytest


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
    trainer, recorder, attached, _ = _build(cfg, tmp_path, 0)
    trainer.train()
    recorder.close()
    assert attached.vllm_injector is not None and attached.vllm_injector.modules
    attached.vllm_injector.check_fired("rollout")  # vLLM's linears were quantized during generation
    assert attached.vllm_aqn is not None and attached.vllm_aqn.applications == 1  # vLLM's own RMSNorm class matched
