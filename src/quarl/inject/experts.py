"""Mixture-of-experts injection: per-expert quantization of transformers' fused 3-D expert weights and inputs.

transformers 5 stores the routed experts of Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, GPT-OSS... in one experts
container (``@use_experts_implementation``): ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)`` (or
``(E, in, out)`` when the class says ``is_transposed``), and its forward dispatches through
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`` (``eager`` / ``grouped_mm`` / ``batched_mm`` ...). No
``*Linear`` module exists per expert, so the linear-layer hooks cannot see them. What a W4A4 MoE kernel computes
for expert ``e`` on the tokens routed to it, ``X_e``:

    H_e = act(e(X_e) e(W1_e)^T)        W1_e = gate_up_proj[e]: (2I, H), blocks along H
    Y_e = e(H_e) e(W2_e)^T             W2_e = down_proj[e]:    (H, I),  blocks along I

with every tensor-level scale (NVFP4's global scale, FP8's per-tensor scale) computed per expert, never across
experts, and blocks along the input dimension only (as vLLM / compressed-tensors store MoE weights: one quantized
linear per expert, gate and up sharing one NVFP4 global scale, which is exactly one scale over ``gate_up_proj[e]``).

How it enters, through the library's own extension points (no model code is patched):

- weights: the experts container gets the same forward pre / post hooks as a linear layer
  (``quarl.inject.injector``); its weight state, `ExpertWeights`, swaps every 3-D expert parameter for its per-expert
  ``e(W)`` for the duration of the forward, cached per weight version by `quarl.inject.weights.WeightCache`, with
  the straight-through gradient to the parameter. Every experts implementation (eager, grouped_mm, ...) then reads
  the quantized experts, so a weight-only injection leaves the routing code and the kernel choice untouched;
- activations (``input`` / ``both``; ``output``): the expert inputs exist only inside the experts forward, so quarl
  registers an experts implementation (`ExpertsDispatch`) in transformers' ``ALL_EXPERTS_FUNCTIONS`` under a
  name owned by the injector and selects it in the experts' config for as long as the injection is attached. It
  runs `experts_forward` (the eager per-expert loop with ``e()`` on each expert's inputs) for the selected
  containers while their injection is active, and the model's previous implementation otherwise (an inactive
  phase, ``bypassed()``, or a container the spec did not select). ``detach`` restores the previous
  implementation and removes the registration.

Input scales follow ``input_scale``: ``dynamic`` takes one scale per expert per call (each expert's routed tokens
form one tensor), ``per_token`` one per token row (the same as before the routing split); ``static`` would need
per-expert calibration and is refused (`quarl.inject.input_scale`). LoRA on the expert weights (PEFT's ``ParamWrapper``, which PEFT's ``all-linear`` applies to experts containers)
parametrizes them as ``W + B A`` during its forward: quarl quantizes ``W`` underneath, so the forward uses
``e(W) + B A`` with the adapter in full precision, as for a LoRA linear (the expert's input quantization then covers
the adapter's matmul too). Expert-parallel containers and two activation injections on one model at once are
refused at attach time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quarl.inject.errors import ErrorModel
from quarl.inject.select import EXPERT_WEIGHTS
from quarl.inject.spec import InjectionPoint
from quarl.inject.telemetry import ModuleTelemetry
from quarl.inject.weights import WeightCache

DISPATCH_PREFIX = "quarl_experts_"


def expert_weights(module: nn.Module) -> list[str]:
    """The names of the 3-D expert weights of an experts container (``gate_up_proj``, ``down_proj``...)."""
    return [n for n in EXPERT_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)
            and getattr(module, n).dim() == 3]


def _slot(module: nn.Module, name: str) -> dict[str, Any]:
    """The ``_parameters`` dict and key holding expert weight ``name``: the module's own entry, or, while the weight
    is parametrized (PEFT's ``ParamWrapper`` LoRA on expert weights registers ``W + B A`` for its forward), the
    parametrization's ``original``, so the forward computes ``e(W) + B A`` (the adapter stays unquantized)."""
    if name in module._parameters:
        return module._parameters, name
    parametrizations = getattr(module, "parametrizations", {})
    if name in parametrizations:
        return parametrizations[name]._parameters, "original"
    raise RuntimeError(f"quarl.inject: expert weight {name!r} of {type(module).__name__} is neither a parameter nor "
                       "a parametrized one; cannot inject it")


def in_features(module: nn.Module, name: str) -> int:
    """The input dimension of expert weight ``name`` (its last dim, or the middle one when ``is_transposed``)."""
    weight = getattr(module, name)
    return weight.shape[-2] if module.is_transposed else weight.shape[-1]


class _PerExpert:
    """An `ErrorModel` applied to each expert's ``(out, in)`` matrix separately (the `WeightCache` error); every
    other attribute (``use_ste``, ``deterministic``...) is the wrapped model's."""

    def __init__(self, error: ErrorModel, transposed: bool) -> None:
        self.error = error
        self.transposed = transposed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.error, name)

    def values(self, param: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``e(W[i])`` for every expert ``i``, blocks along the input dim, in ``param``'s layout (no autograd)."""
        with torch.no_grad():
            mats = param.detach().transpose(-2, -1) if self.transposed else param.detach()  # (E, out, in)
            out = torch.stack([self.error.values(m, generator) for m in mats])  # one tensor-level scale per expert
            return out.transpose(-2, -1).contiguous() if self.transposed else out


class ExpertWeights:
    """Per-expert cached ``e(W)`` of every 3-D weight of one experts container, and their swap in / out.

    Offers what the injector uses of a `WeightCache`: ``swap_in``, ``swap_out``, ``clear`` and ``telemetry``.
    """

    def __init__(self, module: nn.Module, error: ErrorModel, telemetry: ModuleTelemetry,
                 generator: Callable[[torch.device], torch.Generator | None], *, name: str,
                 epoch: Callable[[], object], verify: bool, keep: bool = True) -> None:
        per_expert = _PerExpert(error, bool(module.is_transposed))
        self.caches = {n: WeightCache(per_expert, telemetry, generator, name=f"{name}.{n}", epoch=epoch,
                                      verify=verify, keep=keep) for n in expert_weights(module)}
        self._telemetry = telemetry
        self._saved: list[tuple[dict, str, nn.Parameter]] = []  # (parameters dict, key, Parameter) while swapped

    @property
    def telemetry(self) -> ModuleTelemetry:
        return self._telemetry

    @telemetry.setter
    def telemetry(self, value: ModuleTelemetry) -> None:
        self._telemetry = value
        for cache in self.caches.values():
            cache.telemetry = value

    def swap_in(self, module: nn.Module) -> None:
        """Replace every expert weight by its effective per-expert ``e(W)`` until `swap_out`."""
        if self._saved:  # re-entrant call: already swapped
            return
        for n, cache in self.caches.items():
            params, key = _slot(module, n)
            self._saved.append((params, key, params[key]))
            params[key] = cache.effective(params[key])

    def swap_out(self, module: nn.Module) -> None:
        """Put the original Parameters back (no-op when nothing is swapped in)."""
        for params, key, param in self._saved:
            params[key] = param
        self._saved.clear()

    def clear(self) -> None:
        """Drop the cached tensors."""
        for cache in self.caches.values():
            cache.clear()


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x W^T + b`` for one expert's ``(out, in)`` weight, or ``x W + b`` for an ``(in, out)`` one."""
    if not transposed:
        return F.linear(x, weight, bias)
    out = x @ weight
    return out + bias if bias is not None else out


def experts_forward(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, q_in: Callable[[torch.Tensor], torch.Tensor],
                    q_out: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eager per-expert loop of transformers' experts, with ``q_in`` on each expert's matmul inputs and
    ``q_out`` on each matmul's output (identities give the stock eager result bit for bit).

    Args:
        module: an experts container (``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``...).
        hidden_states: (T, H) tokens.
        top_k_index: (T, K) expert of each routing slot.
        top_k_weights: (T, K) routing weight of each slot.
        q_in: applied to the tokens routed to one expert, (T_e, H), and to its hidden activation, (T_e, I).
        q_out: applied to the outputs of the two matmuls of one expert.

    Returns:
        (T, H) the weighted sum of the experts' outputs.
    """
    num_experts = module.num_experts
    final = torch.zeros_like(hidden_states)  # (T, H)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)  # (E+1, K, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
    up = module.gate_up_proj if module.has_gate else module.up_proj
    up_bias = (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias) if module.has_bias else None
    down_bias = module.down_proj_bias if module.has_bias else None
    for e in hit:
        if e == num_experts:  # the "no expert" slot
            continue
        pos, tok = torch.where(mask[e])  # (T_e,), (T_e,)
        x = q_in(hidden_states[tok])  # (T_e, H)
        h = q_out(_linear(x, up[e], up_bias[e] if up_bias is not None else None, module.is_transposed))
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)  # (T_e, I)
        y = _linear(q_in(h), module.down_proj[e], down_bias[e] if down_bias is not None else None,
                    module.is_transposed)
        y = q_out(y)  # (T_e, H)
        if module.has_post_expert_norm:
            y = module.post_expert_norm(y)
        y = y * top_k_weights[tok, pos, None]
        final.index_add_(0, tok, y.to(final.dtype))
    return final


class ExpertsDispatch:
    """The experts implementation quarl registers for one model config while an activation injection is attached
    (see the module docstring). Owned by the injector as one of its handles: ``remove()`` undoes it."""

    def __init__(self, config: Any) -> None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        self.registry = ALL_EXPERTS_FUNCTIONS
        self.config = config
        self.previous = config._experts_implementation
        self.key = f"{DISPATCH_PREFIX}{id(self):x}"
        self.entries: dict[int, tuple[Any, Callable, Callable]] = {}  # id(module) -> (state, q_in, q_out)
        self.registry[self.key] = self
        config._experts_implementation_internal = self.key  # this config only (the setter recurses into sub-configs)

    def add(self, module: nn.Module, state: Any, q_in: Callable, q_out: Callable) -> None:
        self.entries[id(module)] = (state, q_in, q_out)

    def __call__(self, module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        entry = self.entries.get(id(module))
        if entry is None or not entry[0]._active:
            stock = self.registry.get_interface(self.previous, type(module).forward.__wrapped__)
            return stock(module, hidden_states, top_k_index, top_k_weights)
        state, q_in, q_out = entry
        from quarl.inject.injector import in_backward

        if not in_backward() and state._measuring():  # checkpoint recomputes are not measured twice
            q_in = _measured(q_in, state.telemetry, "input")
            q_out = _measured(q_out, state.telemetry, "output")
        return experts_forward(module, hidden_states, top_k_index, top_k_weights, q_in, q_out)

    def remove(self) -> None:
        """Select the previous implementation again and drop the registration (idempotent)."""
        if self.config._experts_implementation_internal == self.key:
            self.config._experts_implementation_internal = self.previous
        self.registry.pop(self.key, None)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _measured(apply: Callable, telemetry: ModuleTelemetry, role: str) -> Callable:
    if apply is _identity:
        return apply

    def run(x: torch.Tensor) -> torch.Tensor:
        q = apply(x)
        telemetry.measure(role, x, q)
        return q
    return run


def check_experts(selected: list[tuple[str, nn.Module]], error: ErrorModel, point: InjectionPoint) -> None:
    """Refuse, before any hook exists, what the per-expert path cannot emulate faithfully."""
    for fqn, module in selected:
        where = f"{fqn} ({type(module).__name__})"
        if getattr(module, "_is_expert_parallel", False):
            raise ValueError(f"{where}: expert-parallel experts are not supported by quarl's per-expert injection")
        if (point.input or point.output) and str(module.config._experts_implementation).startswith(DISPATCH_PREFIX):
            raise ValueError(f"{where}: another quarl injection with activation error is attached to these "
                             "experts; detach it first (one activation injection per MoE model)")
        for name in expert_weights(module):
            error.check_shape(in_features(module, name), f"{where}.{name}")


def install_experts(injector: Any, fqn: str, module: nn.Module, state: Any) -> list[Any]:
    """Wire one selected experts container into ``injector``: per-expert weight swap through ``state``'s hooks,
    activation error through the registered `ExpertsDispatch` of its config. Returns the new handles."""
    from quarl.inject.injector import activation_fn, epoch_of

    point = injector.spec.injection_point
    if state.weight is not None:
        state.weight = ExpertWeights(module, state.error, state.telemetry, state.rng["weight"], name=fqn,
                                     epoch=epoch_of(injector, fqn), verify=injector.verify_weight_cache,
                                     keep=injector.cache_weights)
    state._input = state._output = False  # the hooks only gate, count and swap weights; activations: the dispatch
    handles = [module.register_forward_pre_hook(state.pre, with_kwargs=True),
               module.register_forward_hook(state.post, with_kwargs=True, always_call=True)]
    if point.input or point.output:
        dispatch = next((h for h in injector._handles if isinstance(h, ExpertsDispatch) and h.config is module.config),
                        None)
        if dispatch is None:
            dispatch = ExpertsDispatch(module.config)
            handles.append(dispatch)
        # the spec's input_scale mode (dynamic per expert, or per token: a row's scale ignores the grouping)
        q_in = injector._input_scales.function(fqn, activation_fn, state.rng["input"]) if point.input else _identity
        q_out = activation_fn(state.error, state.rng["output"]) if point.output else _identity
        dispatch.add(module, state, q_in, q_out)
    return handles
