"""quarl's NVFP4A16 export vs llm-compressor's ``oneshot`` on the shipped testbed (slow; needs a separate venv).

llm-compressor 0.14.0.1 (the newest on PyPI) pins compressed-tensors==0.19.0 and transformers<=5.17, so it cannot
live in the project venv (compressed-tensors 0.20.0, transformers 5.24). Build one aside, with the CPU torch::

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    QUARL_LLMCOMPRESSOR_PYTHON=/tmp/llmc/bin/python pytest -m slow tests/checkpoint/test_llmcompressor.py

Measured (2026-12): every one of the 140 tensors is byte-identical, fused q/k/v and gate/up global scales included;
the loader reads llm-compressor's directory, recognizing it from its quantization_config.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PYTHON = os.environ.get("QUARL_LLMCOMPRESSOR_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PYTHON, reason="set QUARL_LLMCOMPRESSOR_PYTHON to a python with llmcompressor")]


def test_oneshot_nvfp4a16_matches_quarl_byte_for_byte(tmp_path):
    from quarl.checkpoint import load_checkpoint
    from quarl.cli import main
    from quarl.models.load import testbed_dir

    theirs, ours = tmp_path / "llmc", tmp_path / "quarl"
    script = Path(__file__).with_name("_llmc_oneshot.py")
    subprocess.run([PYTHON, str(script), str(testbed_dir()), str(theirs)], check=True, timeout=900,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert main(["quantize", "testbed:tiny", "--scheme", "NVFP4A16", "--out", str(ours), "--no-progress"]) == 0
    a, b = load_file(str(theirs / "model.safetensors")), load_file(str(ours / "model.safetensors"))
    assert set(a) == set(b)
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    assert [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))] == []
    model, _, info = load_checkpoint(theirs)
    assert info.scheme.name == "NVFP4A16" and info.modules == 42
    assert sys.modules.get("llmcompressor") is None  # read with quarl alone
