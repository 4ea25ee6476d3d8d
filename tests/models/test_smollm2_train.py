"""`quarl train` on a real Hugging Face Llama: 2 GRPO steps of SmolLM2-135M-Instruct under NVFP4 W4A4.

The README's path to a real model (``model.name: <HF model or directory>``) exercised end to end, offline: a 49k
vocabulary, a chat template, 30 decoder layers, LoRA on every linear, the injection on every ``base_layer``.
Slow (about 100-150 s per step on a loaded 2-core machine, plus the one-time GGUF conversion).
Run: python -m pytest tests/models/test_smollm2_train.py -m slow -q
"""

import math

from quarl.runs import read_metrics, run_status
from _smollm2 import SMOLLM2_MARKS

pytestmark = SMOLLM2_MARKS

CONFIG = """\
model: {name: smollm2}
injection: {scheme: NVFP4, apply_during: both}
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: [all-linear]}
"""
OVERRIDES = ["grpo.steps=2", "grpo.prompts_per_step=2", "grpo.generations=2", "grpo.max_new_tokens=24",
             "data.train_n=16", "eval.n=4", "eval.batch_size=4", "eval.every=10", "run.checkpoint_every=0"]


def test_two_grpo_steps_under_nvfp4_w4a4(tmp_path):
    from quarl.rl import train

    out = train(CONFIG, OVERRIDES, tmp_path / "run")
    assert run_status(out).value == "finished"
    rows = [r for r in read_metrics(out) if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2]
    # a 135M model rarely solves a problem in 24 tokens: rewards (hence advantages and gradients) may all be 0, so
    # only finiteness is asserted here; gradient flow through the STE is tested on the testbed (tests/rl)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["num_tokens"] > 0 for r in rows)
    assert "val/acc_strict" in rows[-1]
    assert rows[-1]["val/quant_modules"] == 30 * 7  # every linear of every decoder layer, lm_head excluded
