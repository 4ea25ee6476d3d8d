"""`quarl testbed build` reproduces the shipped checkpoint bit for bit (slow: the full 700-step pre-training).

Takes ~12 min on one idle CPU core (17 min on the busy 2-core machine the checkpoint was built on).
Run: python -m pytest tests/models/test_build_repro.py -m slow -q

What is promised: on a given machine, a build is a pure function of DEFAULT_CONFIG (one torch thread,
deterministic algorithms, seeded init and data stream) — two processes give identical tensors, tokenizer and config.
What is not: identical bits on a different CPU or torch build. Float matmul reductions are blocked differently by
the AVX2 / AVX-512 / AMX kernels oneDNN and MKL pick at run time, so the last bits of fp32 weights can differ after
700 AdamW steps. When the comparison fails on another machine, the test still requires the tokenizer and config to
match exactly and the held-out accuracy to agree with the shipped report within the run-to-run noise of a retrain.
"""

import json

import pytest

from quarl.cli import main
from quarl.models.build import compare_checkpoints
from quarl.models import load as load_mod

pytestmark = pytest.mark.slow


def test_build_reproduces_shipped_checkpoint(tmp_path):
    out = tmp_path / "testbed"
    rc = main(["testbed", "build", "--out", str(out), "--compare"])
    diffs = compare_checkpoints(out, load_mod.testbed_dir())
    assert not [d for d in diffs if not d.startswith("tensor ")], diffs  # tokenizer/config always identical
    if rc != 0:  # another CPU: weights differ in low bits; the model must still be the same model
        shipped = json.loads((load_mod.testbed_dir() / "build_report.json").read_text())
        rebuilt = json.loads((out / "build_report.json").read_text())
        # two binomial(500, ~0.73) accuracies differ by > 0.06 with probability < 1e-2 even if independent
        assert abs(rebuilt["heldout_accuracy"] - shipped["heldout_accuracy"]) < 0.06
        pytest.xfail(f"not bit-identical on this CPU (see module docstring): {diffs[:3]}")
    assert diffs == []
