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

Mixture-of-experts models:

- routers are never selected (`is_router`: a class named ``*Router`` / ``*Gate``, or a module called ``gate``,
  ``router`` or ``*_gate`` such as Qwen-MoE's ``shared_expert_gate``; ``gate_proj`` is a dense projection and is
  not a router). A router's matmul is tiny and its output picks the experts: serving stacks keep it in high
  precision (vLLM builds its MoE gates with ``quant_config=None``; llm-compressor recipes ignore ``mlp.gate``);
- an experts container (`is_experts`: transformers' ``@use_experts_implementation`` classes such as
  ``Qwen2MoeExperts``, ``Qwen3MoeExperts``, ``MixtralExperts``, whose experts are 3-D parameters ``gate_up_proj``
  ``(E, 2I, H)`` / ``down_proj`` ``(E, H, I)``) is E linear layers stored side by side: it is selected when a
  ``target_classes`` pattern matches its class name or the plain name ``Linear`` (the default ``*Linear`` does),
  and `quarl.inject.experts` quantizes it per expert. Shared experts are ordinary linears.

Coverage check (nothing may be left in full precision silently): after selection, every module class that owns
weights of two or more dimensions, is neither selected nor ruled out by name (LoRA, head, routers, ``exclude``,
``targets``, ``target_layers``) and is not an embedding, is a *family no pattern matches* -- an unknown experts
container, GPT-2's ``Conv1D``, vLLM's ``FusedMoE``. One holding at least ``UNCOVERED_ERROR_SHARE`` of the model's
matmul parameters raises ValueError naming it (add its name to ``exclude`` to run without it, knowingly); a smaller
one logs a WARNING.
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
_ROUTER_NAME = re.compile(r"^(?:gate|router|\w+_gate)$")  # mlp.gate, router, shared_expert_gate (not gate_proj)
_ROUTER_CLASSES = ("*Router", "*Gate")  # Qwen2MoeTopKRouter, MixtralTopKRouter, DeepSeek's MoEGate
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' fused 3-D expert parameters
UNCOVERED_ERROR_SHARE = 0.05  # an unselected family with this share of the matmul parameters is an error


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


def is_router(module: nn.Module, fqn: str) -> bool:
    """True for an MoE router / gate (see the module docstring); never selected for injection or noise."""
    cls = type(module).__name__
    parts = fqn.split(".")
    name = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]  # a LoRA-wrapped gate's base
    return any(fnmatch.fnmatchcase(cls, p) for p in _ROUTER_CLASSES) or bool(_ROUTER_NAME.match(name))


def is_experts(module: nn.Module) -> bool:
    """True for a transformers experts container (``@use_experts_implementation``: its forward dispatches through
    ``config._experts_implementation``) holding 3-D expert weights."""
    weights = [getattr(module, n, None) for n in EXPERT_WEIGHTS]
    return (hasattr(module, "has_gate") and hasattr(module, "num_experts") and hasattr(module, "config")
            and any(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights))


def _class_matches(module: nn.Module, patterns: tuple[str, ...]) -> bool:
    names = (type(module).__name__, "Linear") if is_experts(module) else (type(module).__name__,)
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__


def _name_filter(spec: InjectionSpec, model: nn.Module | None) -> FilterFn:
    """The rules of ``spec`` that do not look at a module's class or weight shape (LoRA, routers, head, exclude,
    targets, target_layers): what `make_filter_fn` adds the class rules to, and what `uncovered_families` checks."""
    head = output_head(model) if model is not None else None
    targets = [re.compile(p) for p in spec.targets]
    exclude = [re.compile(p) for p in spec.exclude]
    layers = set(spec.target_layers)

    def by_name(module: nn.Module, fqn: str) -> bool:
        if is_lora_adapter(fqn) or isinstance(getattr(module, "base_layer", None), nn.Module):
            return False
        if is_router(module, fqn):
            return False
        if _is_head(module, fqn, head):
            if not spec.quantize_lm_head:
                return False
        elif any(p.search(fqn) for p in exclude):
            return False
        if targets and not any(p.search(fqn) for p in targets):
            return False
        return not layers or block_index(fqn) in layers

    return by_name


def make_filter_fn(spec: InjectionSpec, model: nn.Module | None = None) -> FilterFn:
    """Build ``filter_fn(module, fqn) -> bool`` for ``spec`` (pass ``model`` to recognise a renamed output head).

    Args:
        spec: the injection spec (targets, target_classes, exclude, target_layers, quantize_lm_head).
        model: the root model, used only to find ``get_output_embeddings()``.

    Returns:
        The filter, usable with torchao's ``quantize_(model, config, filter_fn=...)`` as well.
    """
    by_name = _name_filter(spec, model)

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        if not _class_matches(module, spec.target_classes):
            return False
        if spec.injection_point.weight and not (_has_linear_weight(module) or is_experts(module)):
            return False
        return by_name(module, fqn)

    return filter_fn


def uncovered_families(model: nn.Module, spec: InjectionSpec,
                       chosen: list[tuple[str, nn.Module]]) -> list[tuple[str, float, list[str]]]:
    """Module classes with >= 2-D weights that the spec leaves out only because no class pattern matches them.

    Returns:
        ``(class name, share of the model's matmul parameters, qualified names)`` per class, largest share first.
        Matmul parameters: every parameter of two or more dimensions outside embeddings.
    """
    by_name = _name_filter(spec, model)
    picked = {id(m) for _, m in chosen}
    total = 0
    families: dict[str, list] = {}
    for fqn, module in model.named_modules():
        n = sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
        if not n or _is_embedding(module):
            continue
        total += n
        if id(module) in picked or not by_name(module, fqn):
            continue
        entry = families.setdefault(type(module).__name__, [0, []])
        entry[0] += n
        entry[1].append(fqn)
    found = [(cls, n / total, names) for cls, (n, names) in families.items()]
    return sorted(found, key=lambda f: -f[1])


def _check_coverage(model: nn.Module, spec: InjectionSpec, chosen: list[tuple[str, nn.Module]]) -> None:
    """Raise (a large family) or warn (a small one) about families no pattern matches; see the module docstring."""
    for cls, share, names in uncovered_families(model, spec, chosen):
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        what = (f"{len(names)} {cls} module(s) ({shown}) hold {100 * share:.1f}% of the matmul parameters of "
                f"{type(model).__name__} and no target_classes pattern {spec.target_classes} selects them: they "
                "would run in full precision")
        if share >= UNCOVERED_ERROR_SHARE:
            raise ValueError(f"InjectionSpec: {what}. Add a regex matching them to `exclude` to run without them "
                             "knowingly, or a `target_classes` pattern if they are linear layers (y = x W^T)")
        logger.warning("quarl.inject: %s", what)


def select_modules(model: nn.Module, spec: InjectionSpec) -> list[tuple[str, nn.Module]]:
    """All ``(fqn, module)`` pairs the spec selects, in ``named_modules`` order.

    Raises:
        ValueError: when nothing matches, with the candidate linear-like modules listed so the fix is obvious; when
            a module family no pattern matches holds a large share of the matmul parameters (`uncovered_families`).
    """
    keep = make_filter_fn(spec, model)
    chosen = [(fqn, m) for fqn, m in model.named_modules() if keep(m, fqn)]  # fqn '' = a bare root layer
    if chosen:
        heads = [fqn for fqn, m in chosen if _is_head(m, fqn, output_head(model))]
        if heads:
            logger.warning("quantize_lm_head=True: the output head %s is injected", heads)
        _check_coverage(model, spec, chosen)
        return chosen
    candidates = [f"{fqn} ({type(m).__name__})" for fqn, m in model.named_modules()
                  if _has_linear_weight(m) and not is_lora_adapter(fqn)]
    shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
    raise ValueError(
        f"InjectionSpec matches zero modules of {type(model).__name__} (targets={spec.targets}, "
        f"target_classes={spec.target_classes}, exclude={spec.exclude}, target_layers={spec.target_layers}); "
        f"{len(candidates)} modules with a 2-D weight exist: {shown or 'none'}"
    )
