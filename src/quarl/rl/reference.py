"""``grpo.reference: unquantized``: recognise TRL's beta-KL reference forward, to run it without the injection.

With a PEFT model and no separate reference model, TRL computes the reference log-probs with the same model, either
with its "ref" adapter active (re-training an existing adapter) or with adapters disabled (a new adapter) -- see
``use_adapter`` in ``_generate_and_score_completions``. Without quarl, that reference is the base under the
injection; `is_reference_forward` lets the engine bypass the injection for exactly that forward, so the KL pulls the
quantized policy toward the full-precision model.
"""

from __future__ import annotations

from typing import Any


def is_reference_forward(model: Any) -> bool:
    """Whether the coming forward of the (unwrapped, PEFT) ``model`` is TRL's reference: "ref" adapter active, or
    adapters disabled."""
    if getattr(model, "active_adapter", None) == "ref":
        return True
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is not None and layer.disable_adapters
