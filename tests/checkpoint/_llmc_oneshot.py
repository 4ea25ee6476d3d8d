"""Run llm-compressor's oneshot NVFP4A16 on a model directory: ``python _llmc_oneshot.py SRC OUT``.

Executed by test_llmcompressor.py with the interpreter in $QUARL_LLMCOMPRESSOR_PYTHON (a separate venv: llmcompressor
0.14 pins compressed-tensors 0.19 and transformers <= 5.17, which the project venv does not have). Not a test module.
"""

import sys

from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(src)
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="NVFP4A16", ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
tokenizer.save_pretrained(out)
