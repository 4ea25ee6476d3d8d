"""Operator-level injection: error in the ``F.linear`` / ``matmul`` calls made inside a context manager.

    with inject_ops(spec, model=model, phase="rollout") as ops:
        model(ids)                       # F.linear / matmul calls using a *selected* module's weight are injected
    ops.stats()                          # {'linear': {...}, 'matmul': {...}, 'modules': {fqn: calls}}

    with inject_ops(spec, all_ops=True):  # explicit opt-in: EVERY F.linear / matmul call, no selection at all
        ...

Why. Module hooks only see modules; code that calls ``F.linear`` or ``x @ W`` directly (custom attention, fused
blocks, vLLM-style layers) is invisible to them. The verl fork's "noisy ops" mode and microxcaling's
``inject_pyt_ops`` rewrote ``torch.*`` globally, which leaks into unrelated code and survives exceptions. Here a
``torch.overrides.TorchFunctionMode`` intercepts the calls only inside the ``with`` block, on this thread; nothing
in ``torch`` is patched, and leaving the block (normally or by an exception) restores everything.

Selection (``model=``; the default and the only mode that honours the spec's selection). The modules are chosen by
exactly the filter module hooks use (`quarl.inject.select`: targets, target_classes, exclude, target_layers,
``quantize_lm_head``, and LoRA adapters never). On entering the block every parameter of ``model`` is indexed by
identity and by its storage (so views such as ``W.t()``, ``W.detach()`` or a slice of a fused weight are
recognised). A call is then routed by its operands:

- an operand is the weight (or a view of the weight) of a selected module -> injected: that operand in the
  ``weight`` role (its view is taken of the cached e(W)), the other operand in the ``input`` role;
- an operand is any other parameter of the model (lm_head, embeddings, lora_A / lora_B, excluded layers) -> left
  alone, counted as ``not_selected``;
- no operand belongs to the model (activation x activation matmuls such as attention scores, weights built on the
  fly or cast to another dtype, another model's weights) -> left alone, counted as ``unattributed``: without a
  module name nothing proves the call is not an adapter or the head. Use ``all_ops=True`` to inject those too.

``all_ops=True`` (no model): the pre-selection behaviour, every call injected, lm_head and adapters included; it
must be asked for by name because it quantizes lm_head and the LoRA
adapters, which must stay in full precision. Without ``model`` and without ``all_ops``
`inject_ops` raises.

Semantics per injected call, by ``injection_point``:
- ``F.linear(x, W, b)``: ``weight`` -> e(W) (cached per weight version, as in `quarl.inject.weights`), ``input`` ->
  e(x), ``both`` -> both, ``output`` -> e(y).
- ``matmul`` family (``torch.matmul``, ``Tensor.matmul``, ``@``, ``torch.mm``, ``torch.bmm``): with a model, the
  operand that is a selected weight is a weight and the other an input; with ``all_ops`` both operands are
  activations (``input``/``both`` inject both, ``weight`` leaves them alone). ``output`` injects the result.
Gradient semantics are those of `quarl.inject.errors`; with a model the noise generators are seeded per module and
role exactly as module hooks seed them (``module_seed(seed, f"{fqn}:{role}")``).
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from quarl.inject.errors import ErrorModel, module_seed
from quarl.inject.select import is_experts, select_modules
from quarl.inject.spec import ApplyDuring, InjectionSpec, Phase
from quarl.inject.telemetry import ModuleTelemetry
from quarl.inject.weights import WeightCache, WeightEpoch, verify_enabled

_OPS = {
    F.linear: "linear",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.mm: "matmul", torch.bmm: "matmul", torch.Tensor.mm: "matmul", torch.Tensor.bmm: "matmul",
}
_OPERAND_KWARGS = {"linear": ("input", "weight"), "matmul": ("input", "other", "mat2")}
_Owner = tuple[nn.Parameter, "str | None"]  # (parameter, fqn of its selected module, or None when not selected)


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta / fake / functional)
        return None


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """First and last storage element ``t`` touches."""
    last = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.size(), t.stride()) if s > 0)
    return t.storage_offset(), last


class WeightOwners:
    """Which parameter of a model (and which selected module) a tensor is, or is a view of."""

    def __init__(self, model: nn.Module, selected: list[tuple[str, nn.Module]]) -> None:
        self.by_id: dict[int, _Owner] = {}
        self.by_storage: dict[int, list[_Owner]] = {}
        chosen = {id(m._parameters["weight"]): fqn for fqn, m in selected
                  if isinstance(m._parameters.get("weight"), torch.Tensor)}
        for _, param in model.named_parameters(remove_duplicate=False):
            owner = (param, chosen.get(id(param)))
            self.by_id[id(param)] = owner
            ptr = _storage(param)
            if ptr is not None:
                self.by_storage.setdefault(ptr, []).append(owner)

    def owner(self, t: Any) -> _Owner | None:
        """The owning ``(parameter, fqn-or-None)`` of ``t``, or None when ``t`` is not (a view of) a parameter."""
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.by_id.get(id(t))
        if hit is not None and hit[0] is t:
            return hit
        lo, hi = _extent(t)
        for param, fqn in self.by_storage.get(_storage(t), ()):
            p_lo, p_hi = _extent(param)
            if param.dtype == t.dtype and p_lo <= lo and hi <= p_hi and t.numel() > 0:
                return param, fqn
        return None


class OpInjector(TorchFunctionMode):
    """The context manager returned by `inject_ops` (a TorchFunctionMode; active only inside ``with``)."""

    def __init__(self, spec: InjectionSpec, phase: Phase | str | None = None, *, model: nn.Module | None = None,
                 all_ops: bool = False) -> None:
        super().__init__()
        if (model is None) != bool(all_ops):
            raise ValueError(
                "inject_ops needs model=<the model> so that exclude, quantize_lm_head and the never-quantize-LoRA "
                "rule apply; pass all_ops=True (and no model) to inject EVERY F.linear/matmul call, lm_head and "
                "adapters included" if model is None else "inject_ops: pass model= or all_ops=True, not both")
        self.spec = spec
        self.phase = Phase(phase) if isinstance(phase, str) else phase
        if self.phase is None and spec.apply_during is not ApplyDuring.BOTH:
            raise ValueError(f"inject_ops: apply_during={spec.apply_during.value!r} needs an explicit phase")
        self.model = model
        self.selected = select_modules(model, spec) if model is not None else []  # raises on zero matches
        experts = [fqn for fqn, m in self.selected if is_experts(m)]
        if experts:  # grouped_mm is not an F.linear / matmul call, and a 3-D weight's e(W) must be taken per expert
            raise ValueError(f"inject_ops cannot inject fused MoE experts ({', '.join(experts[:3])}): use "
                             "attach(model, spec), which quantizes them per expert, or exclude them")
        if spec.input_scale != "dynamic":  # never a silent dynamic scale: the per-module modes live in attach()
            raise ValueError(f"inject_ops does not implement input_scale={spec.input_scale!r}; use attach(model, "
                             "spec), which binds static / per-token input scales per module")
        if spec.rotation != "none" or spec.plan is not None:  # per-module rotations / formats live in attach()
            raise ValueError("inject_ops does not implement rotation or a precision plan; use attach(model, spec)")
        self.error = ErrorModel.from_spec(spec)
        self.telemetry = {op: ModuleTelemetry() for op in ("linear", "matmul")}
        self.routed = {op: Counter() for op in ("linear", "matmul")}  # 'not_selected' / 'unattributed' calls
        self.module_calls: Counter = Counter()  # fqn -> injected calls (model mode)
        self._owners: WeightOwners | None = None
        self._gens: dict[tuple[str, torch.device], torch.Generator] = {}
        self._weights: dict[int, tuple[weakref.ref, WeightCache]] = {}
        self._epoch = WeightEpoch()  # moved by optimizer steps inside the block and by invalidate_weights
        self._verify = verify_enabled()
        self._step_hook: torch.utils.hooks.RemovableHandle | None = None

    def _active(self) -> tuple[str, bool]:
        if self.phase is None:
            return "unset", True
        return self.phase.value, self.spec.apply_during.covers(self.phase)

    def _gen(self, name: str, device: torch.device) -> torch.Generator | None:
        if not self.spec.is_noise:
            return None
        if (name, device) not in self._gens:
            self._gens[(name, device)] = torch.Generator(device=device).manual_seed(module_seed(self.spec.seed, name))
        return self._gens[(name, device)]

    def _inject(self, op: str, who: str, role: str, x: torch.Tensor) -> torch.Tensor:
        q = self.error(x, self._gen(f"{who}:{role}", x.device))
        self.telemetry[op].measure(role, x, q)
        return q

    def _weight(self, op: str, who: str, w: torch.Tensor) -> torch.Tensor:
        """e(w), cached per version of the Parameter ``w`` (`quarl.inject.weights.WeightCache`: the same freshness
        rules and verify mode as module hooks), with the spec's gradient semantics."""
        if not isinstance(w, nn.Parameter):  # all_ops temporaries: no stable identity to cache on
            return self._inject(op, who, "weight", w)
        entry = self._weights.get(id(w))
        if entry is None or entry[0]() is not w:
            cache = WeightCache(self.error, self.telemetry[op], lambda dev, name=f"{who}:weight": self._gen(name, dev),
                                name=who, epoch=self._epoch, verify=self._verify)
            entry = self._weights[id(w)] = (weakref.ref(w), cache)
        cache = entry[1]
        cache.telemetry = self.telemetry[op]  # counted under the op that (re)computes it
        return cache.effective(w)

    def invalidate_weights(self) -> None:
        """Drop every cached e(W) (after writing weights through ``.data`` inside the block)."""
        self._epoch.bump()
        self._weights.clear()

    def _weight_view(self, op: str, fqn: str, t: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        """The operand ``t`` (``param`` itself or a view of it) taken from the cached e(param)."""
        eff = self._weight(op, fqn, param)
        if t is param:
            return eff
        if not (param.is_contiguous() and eff.is_contiguous()):  # no shared layout: inject the view itself
            return self._inject(op, fqn, "weight", t)
        return eff.as_strided(t.size(), t.stride(), t.storage_offset() - param.storage_offset())

    def _route(self, op: str, args: list) -> tuple[str, dict[int, nn.Parameter]] | None:
        """``(who, {operand index: weight param})`` for a call to inject, or None (counted) to leave it alone."""
        if self._owners is None:  # all_ops
            return "<op>", ({1: args[1]} if op == "linear" else {})
        idx = (1,) if op == "linear" else (0, 1)
        owners = {i: self._owners.owner(args[i]) for i in idx}
        if any(o is not None and o[1] is None for o in owners.values()):
            self.routed[op]["not_selected"] += 1
            return None
        weights = {i: o for i, o in owners.items() if o is not None}
        if not weights:
            self.routed[op]["unattributed"] += 1
            return None
        return next(iter(weights.values()))[1], {i: o[0] for i, o in weights.items()}

    def _apply(self, op: str, who: str, weights: dict[int, nn.Parameter], args: list) -> None:
        point = self.spec.injection_point
        for i in (0, 1):
            if i in weights and point.weight:
                w = weights[i]
                args[i] = self._weight(op, who, w) if args[i] is w else self._weight_view(op, who, args[i], w)
            elif i not in weights and point.input and (i == 0 or op == "matmul"):
                args[i] = self._inject(op, who, "input", args[i])

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        op = _OPS.get(func)
        if op is None:
            return func(*args, **kwargs)
        args = list(args)
        for name in _OPERAND_KWARGS[op]:  # F.linear(x, weight=W) and friends: operands positional
            if len(args) < 2 and name in kwargs:
                args.append(kwargs.pop(name))
        route = self._route(op, args)
        if route is None:
            return func(*args, **kwargs)
        who, weights = route
        phase, active = self._active()
        tel = self.telemetry[op]
        if not active:
            tel.skipped[phase] += 1
            return func(*args, **kwargs)
        tel.fires[phase] += 1
        if self._owners is not None:
            self.module_calls[who] += 1
        self._apply(op, who, weights, args)
        out = func(*args, **kwargs)
        return self._inject(op, who, "output", out) if self.spec.injection_point.output else out

    def __enter__(self) -> OpInjector:
        if self.model is not None:  # indexed on entry: parameters may have been replaced since construction
            self._owners = WeightOwners(self.model, self.selected)
        self._step_hook = self._epoch.watch_optimizers()
        return super().__enter__()

    def __exit__(self, *exc: object) -> Any:
        self._weights.clear()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        self._owners = None  # drop the strong references to the model's parameters
        return super().__exit__(*exc)

    def stats(self) -> dict[str, dict]:
        """Per op ('linear', 'matmul'): fires / skipped per phase, error statistics per role and the calls left
        alone (``not_selected``: another parameter of the model; ``unattributed``: no model operand); with a model,
        ``'modules'``: injected calls per selected module."""
        out: dict[str, dict] = {op: {**tel.summary(), "not_selected": self.routed[op]["not_selected"],
                                     "unattributed": self.routed[op]["unattributed"]}
                                for op, tel in self.telemetry.items()}
        out["modules"] = dict(self.module_calls)
        return out


def inject_ops(spec: InjectionSpec, *, model: nn.Module | None = None, phase: Phase | str | None = None,
               all_ops: bool = False) -> OpInjector:
    """A context manager injecting ``spec``'s error into the F.linear / matmul calls made inside it.

    Args:
        spec: the injection.
        model: the model whose selected modules' weights mark the calls to inject (targets, exclude,
            target_layers, quantize_lm_head and the LoRA rule apply, as for `quarl.inject.attach`).
        phase: the phase the block runs in; required unless ``spec.apply_during == "both"``.
        all_ops: explicit opt-in to inject every F.linear / matmul call with no selection (lm_head and LoRA
            adapters included); only without ``model``.

    Raises:
        ValueError: without ``model`` and without ``all_ops``, with both, when the spec selects no module of
            ``model``, or when ``apply_during`` needs a phase and none is given.
    """
    return OpInjector(spec, phase, model=model, all_ops=all_ops)
