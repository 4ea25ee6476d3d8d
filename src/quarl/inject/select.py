"""Which modules an `InjectionSpec` touches: a ``filter_fn(module, fqn) -> bool`` in torchao's ``quantize_`` style.

A module is selected when, in this order:

1. no component of its qualified name starts with ``lora_`` (PEFT adapters: ``lora_A``, ``lora_B``,
   ``lora_embedding_A``...): adapters are never quantized, whatever the spec says (quantized adapters cost
   one run 31 points: 32.75% -> 63.84% once excluded);
2. it is not a wrapper holding a ``base_layer`` (PEFT ``lora.Linear``): the wrapped ``base_layer`` is selected
   instead, so only the frozen base weight is quantized;
3. its class name matches a ``target_classes`` pattern (``fnmatch``; default ``*Linear`` also covers vLLM
   ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``QKVParallelLinear``), and — for weight injection — it has a
   2-D ``.weight`` (linear semantics: ``y = x W^T``);
4. the output head (``lm_head``, or the model's ``get_output_embeddings()``) only with ``quantize_lm_head=True``
   (which then overrides ``exclude``, not ``targets`` / ``target_layers``), because quantizing it collapsed NVFP4
   runs to 7.66%;
5. no ``exclude`` regex is found in its name, every ``targets`` regex list (when given) has a hit, and its decoder
   block index (``…layers.<i>.…``, ``…h.<i>.…``, ``…blocks.<i>.…``) is in ``target_layers`` (when given).

`select_modules` raises when nothing matches: a spec that silently touches zero modules is how AQN runs lied (a
class check that matched zero modules in vLLM, so no noise was ever added).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from quarl.inject.spec import InjectionSpec

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def is_lora_adapter(fqn: str) -> bool:
    """True for PEFT adapter modules and anything inside them (``…q_proj.lora_A.default``)."""
    return any(part.startswith("lora_") for part in fqn.split("."))


def block_index(fqn: str) -> int | None:
    """Decoder-block index in a qualified name (``model.layers.3.mlp.up_proj`` -> 3), or None."""
    m = _BLOCK.search(fqn)
    return int(m.group(1)) if m else None


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (``get_output_embeddings()``) when it defines one."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        head = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        head = None
    return head if isinstance(head, nn.Module) else None


def _is_head(module: nn.Module, fqn: str, head: nn.Module | None) -> bool:
    return fqn.split(".")[-1] == "lm_head" or (head is not None and module is head)


def _has_linear_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def make_filter_fn(spec: InjectionSpec, model: nn.Module | None = None) -> FilterFn:
    """Build ``filter_fn(module, fqn) -> bool`` for ``spec`` (pass ``model`` to recognise a renamed output head).

    Args:
        spec: the injection spec (targets, target_classes, exclude, target_layers, quantize_lm_head).
        model: the root model, used only to find ``get_output_embeddings()``.

    Returns:
        The filter, usable with torchao's ``quantize_(model, config, filter_fn=...)`` as well.
    """
    head = output_head(model) if model is not None else None
    targets = [re.compile(p) for p in spec.targets]
    exclude = [re.compile(p) for p in spec.exclude]
    layers = set(spec.target_layers)

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        if is_lora_adapter(fqn) or isinstance(getattr(module, "base_layer", None), nn.Module):
            return False
        cls = type(module).__name__
        if not any(fnmatch.fnmatchcase(cls, p) for p in spec.target_classes):
            return False
        if spec.injection_point.weight and not _has_linear_weight(module):
            return False
        if _is_head(module, fqn, head):
            if not spec.quantize_lm_head:
                return False
        elif any(p.search(fqn) for p in exclude):
            return False
        if targets and not any(p.search(fqn) for p in targets):
            return False
        return not layers or block_index(fqn) in layers

    return filter_fn


def select_modules(model: nn.Module, spec: InjectionSpec) -> list[tuple[str, nn.Module]]:
    """All ``(fqn, module)`` pairs the spec selects, in ``named_modules`` order.

    Raises:
        ValueError: when nothing matches, with the candidate linear-like modules listed so the fix is obvious.
    """
    keep = make_filter_fn(spec, model)
    chosen = [(fqn, m) for fqn, m in model.named_modules() if keep(m, fqn)]  # fqn '' = a bare root layer
    if chosen:
        heads = [fqn for fqn, m in chosen if _is_head(m, fqn, output_head(model))]
        if heads:
            logger.warning("quantize_lm_head=True: the output head %s is injected", heads)
        return chosen
    candidates = [f"{fqn} ({type(m).__name__})" for fqn, m in model.named_modules()
                  if _has_linear_weight(m) and not is_lora_adapter(fqn)]
    shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
    raise ValueError(
        f"InjectionSpec matches zero modules of {type(model).__name__} (targets={spec.targets}, "
        f"target_classes={spec.target_classes}, exclude={spec.exclude}, target_layers={spec.target_layers}); "
        f"{len(candidates)} modules with a 2-D weight exist: {shown or 'none'}"
    )
