"""vLLM loads a quarl-exported NVFP4A16 checkpoint and generates (GPU + vLLM only; skips cleanly otherwise).

Run: pytest -m gpu tests/checkpoint/test_vllm_gpu.py

The testbed (hidden 96, 3 heads) is smaller than some vLLM FP4 kernels' tile sizes; a kernel-shape refusal is
reported as a skip with vLLM's message, never as a pass.
"""

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]


def test_vllm_generates_from_the_exported_nvfp4a16_testbed(tmp_path):
    from vllm import LLM, SamplingParams

    from quarl.cli import main

    out = tmp_path / "testbed-nvfp4a16"
    assert main(["quantize", "testbed:tiny", "--scheme", "NVFP4A16", "--out", str(out), "--no-progress"]) == 0
    try:
        llm = LLM(model=str(out), dtype="float16", enforce_eager=True, gpu_memory_utilization=0.2, max_model_len=256)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        if "shape" in str(exc).lower() or "divisible" in str(exc).lower() or "not supported" in str(exc).lower():
            pytest.skip(f"vLLM refused the testbed's shapes: {exc}")
        raise
    outs = llm.generate(["Tom has 3 apples and buys 4 more. How many apples does he have?"],
                        SamplingParams(max_tokens=16, temperature=0.0))
    assert outs[0].outputs[0].token_ids  # generated at least one token
