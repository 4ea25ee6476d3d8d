"""A live vLLM engine with quarl's worker extension (GPU only; skips cleanly without CUDA, vLLM or verl).

Run (on a GPU machine): nox -s verl -- -m gpu

Starts vLLM on quarl's shipped testbed model (a tiny Llama, fp32) with ``worker_extension_cls`` set as verl sets it,
attaches quarl through ``monkey_patch_model`` (verl's call after engine start), generates, and reads the rollout
telemetry through ``collective_rpc``; and checks that CUDA graphs (``enforce_eager=False``) are refused.
"""

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("verl.workers")
vllm = pytest.importorskip("vllm")

import quarl  # noqa: E402

TESTBED = str(Path(quarl.__file__).parent / "assets" / "testbed")
BLOCK = ("quarl:\n  injection: {scheme: MXFP4}\n  aqn: {schedule: constant, sigma_start: 0.01}\n"
         "  total_steps: 10\n")


def _llm(enforce_eager: bool):
    return vllm.LLM(model=TESTBED, dtype="float32", enforce_eager=enforce_eager, gpu_memory_utilization=0.2,
                    max_model_len=256, worker_extension_cls="quarl.verl.rollout.QuarlWorkerExtension")


def test_live_vllm_rollout_runs_quarls_hooks(monkeypatch):
    monkeypatch.setenv("QUARL_VERL_CONFIG", BLOCK)  # vLLM's worker processes inherit it
    llm = _llm(enforce_eager=True)
    llm.collective_rpc("monkey_patch_model", kwargs={"vocab_size": 298})
    llm.generate(["Q: 2 + 3 = ?\nA:"], vllm.SamplingParams(max_tokens=8, temperature=0.0))
    stats = llm.collective_rpc("quarl_stats")[0]
    assert stats["quarl/rollout/modules"] > 0 and stats["quarl/rollout/fires"] > 0


def test_cuda_graphs_are_refused(monkeypatch):
    monkeypatch.setenv("QUARL_VERL_CONFIG", BLOCK)
    llm = _llm(enforce_eager=False)
    with pytest.raises(Exception, match="enforce_eager=True"):
        llm.collective_rpc("monkey_patch_model", kwargs={"vocab_size": 298})
