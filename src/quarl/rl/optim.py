"""``lora.norms_lr``: the trainable norm gains in their own optimizer param group.

HF's Trainer builds param groups by weight decay only, with one lr. The trainable RMSNorm gains (PEFT
``modules_to_save`` copies) move by about lr per Adam step, like every parameter, so they get a group of their own
with ``lora.norms_lr``; the LR scheduler then scales both groups alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def split_norm_group(optimizer: Any, named_parameters: Iterable[tuple[str, Any]], lr: float) -> int:
    """Move every ``modules_to_save`` parameter of each group into a copy of that group with ``lr``; returns how many
    parameters moved (0 is an error: ``lora.norms_lr`` without trainable norms would silently do nothing)."""
    names = {id(p): n for n, p in named_parameters}
    moved = 0
    for group in list(optimizer.param_groups):
        norms = [p for p in group["params"] if "modules_to_save" in names.get(id(p), "")]
        if norms:
            group["params"] = [p for p in group["params"] if all(p is not q for q in norms)]
            optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": norms, "lr": lr})
            moved += len(norms)
    if moved == 0:
        raise ValueError("lora.norms_lr is set but the optimizer holds no trainable norm gains (modules_to_save)")
    return moved
