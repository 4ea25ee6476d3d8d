"""quarl: quantization-aware reinforcement learning for LLMs.

Subpackages (imports run one way, left to right; ``tests/test_structure.py`` enforces it):

    formats, data  ->  inject  ->  noise, diagnose  ->  eval  ->  models, rl  ->  cli

- ``quarl.formats``  bit-exact emulation of low-bit formats (MXFP4, NVFP4, FP8, INT, NF4); pure tensor -> tensor.
- ``quarl.inject``   where quantization / hardware error enters a model (hooks, phases, STE, telemetry).
- ``quarl.diagnose`` why a quantized model fails: per-layer error, KL, gradient flow, sensitivity.
- ``quarl.data``     GSM8K loaders (HF, verl parquet, JSONL) and offline synthetic GSM8K-format tasks.
- ``quarl.eval``     GSM8K scoring exactly as verl does, and the evaluation harness.
- ``quarl.models``   model loading (HF id / dir, GGUF, the embedded testbed).

Importing ``quarl`` is cheap: subpackages are imported on use.
"""

__version__ = "0.1.0"
