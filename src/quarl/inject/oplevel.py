"""Operator-level injection: error in every ``F.linear`` / ``matmul`` call made inside a context manager.

    with inject_ops(InjectionSpec(error_type="relative_gaussian", error_scale=1e-3,
                                  injection_point="input"), phase="rollout") as ops:
        model(ids)                       # every F.linear / torch.matmul / @ / bmm / mm call is injected
    ops.stats()                          # {'linear': {...}, 'matmul': {...}}

Why. Module hooks only see modules; code that calls ``F.linear`` or ``x @ W`` directly (custom attention, fused
blocks, vLLM-style layers) is invisible to them. The verl fork's "noisy ops" mode and microxcaling's
``inject_pyt_ops`` rewrote ``torch.*`` globally, which leaks into unrelated code and survives exceptions. Here a
``torch.overrides.TorchFunctionMode`` intercepts the calls only inside the ``with`` block, on this thread; nothing
in ``torch`` is patched, and leaving the block (normally or by an exception) restores everything.

Semantics per call, by ``injection_point``:
- ``F.linear(x, W, b)``: ``weight`` -> e(W) (cached per weight version for ``nn.Parameter`` weights, as in
  `quarl.inject.weights`), ``input`` -> e(x), ``both`` -> both, ``output`` -> e(y).
- ``matmul`` family (``torch.matmul``, ``Tensor.matmul``, ``@``, ``torch.mm``, ``torch.bmm``): both operands are
  activations: ``input``/``both`` inject both operands, ``output`` the result; ``weight`` leaves them alone.
Selection (targets / exclude / layers) does not apply: there are no module names at this level. Gradient semantics
and seeding are those of `quarl.inject.errors`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from quarl.inject.errors import ErrorModel, module_seed, pass_through
from quarl.inject.spec import ApplyDuring, InjectionSpec, Phase
from quarl.inject.telemetry import ModuleTelemetry
from quarl.inject.weights import weight_key

_OPS = {
    F.linear: "linear",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.mm: "matmul", torch.bmm: "matmul", torch.Tensor.mm: "matmul", torch.Tensor.bmm: "matmul",
}


class OpInjector(TorchFunctionMode):
    """The context manager returned by `inject_ops` (a TorchFunctionMode; active only inside ``with``)."""

    def __init__(self, spec: InjectionSpec, phase: Phase | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.phase = Phase(phase) if isinstance(phase, str) else phase
        if self.phase is None and spec.apply_during is not ApplyDuring.BOTH:
            raise ValueError(f"inject_ops: apply_during={spec.apply_during.value!r} needs an explicit phase")
        self.error = ErrorModel.from_spec(spec)
        self.telemetry = {op: ModuleTelemetry() for op in ("linear", "matmul")}
        self._gens: dict[tuple[str, torch.device], torch.Generator] = {}
        self._weights: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}

    def _active(self) -> tuple[str, bool]:
        if self.phase is None:
            return "unset", True
        return self.phase.value, self.spec.apply_during.covers(self.phase)

    def _gen(self, role: str, device: torch.device) -> torch.Generator | None:
        if not self.spec.is_noise:
            return None
        if (role, device) not in self._gens:
            seed = module_seed(self.spec.seed, f"<op>:{role}")
            self._gens[(role, device)] = torch.Generator(device=device).manual_seed(seed)
        return self._gens[(role, device)]

    def _inject(self, op: str, role: str, x: torch.Tensor) -> torch.Tensor:
        q = self.error(x, self._gen(role, x.device))
        self.telemetry[op].measure(role, x, q)
        return q

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        if not isinstance(w, torch.nn.Parameter):  # temporaries: no stable identity to cache on
            return self._inject("linear", "weight", w)
        key = weight_key(w)
        entry = self._weights.get(id(w))
        if entry is None or entry[0]() is not w or entry[1] != key:
            value = self.error.values(w, self._gen("weight", w.device))
            self._weights[id(w)] = (weakref.ref(w), key, value)
            self.telemetry["linear"].weight_computations += 1
            self.telemetry["linear"].measure("weight", w, value)
        value = self._weights[id(w)][2]
        return pass_through(w, value) if self.error.use_ste else value

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        op = _OPS.get(func)
        if op is None:
            return func(*args, **kwargs)
        phase, active = self._active()
        tel = self.telemetry[op]
        if not active:
            tel.skipped[phase] += 1
            return func(*args, **kwargs)
        tel.fires[phase] += 1
        point = self.spec.injection_point
        args = list(args)
        if op == "linear":
            if point.input:
                args[0] = self._inject(op, "input", args[0])
            if point.weight:
                args[1] = self._weight(args[1])
        elif point.input:
            args[0], args[1] = self._inject(op, "input", args[0]), self._inject(op, "input", args[1])
        out = func(*args, **kwargs)
        return self._inject(op, "output", out) if point.output else out

    def __exit__(self, *exc: object) -> Any:
        self._weights.clear()
        return super().__exit__(*exc)

    def stats(self) -> dict[str, dict]:
        """Per op ('linear', 'matmul'): fires / skipped per phase and error statistics per role."""
        return {op: tel.summary() for op, tel in self.telemetry.items()}


def inject_ops(spec: InjectionSpec, *, phase: Phase | str | None = None) -> OpInjector:
    """A context manager injecting ``spec``'s error into every F.linear / matmul call made inside it.

    Args:
        spec: the injection (targets/exclude/target_layers are ignored at op level).
        phase: the phase the block runs in; required unless ``spec.apply_during == "both"``.
    """
    return OpInjector(spec, phase)
