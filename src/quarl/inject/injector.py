"""The `Injector`: attaches an `InjectionSpec` to a model and owns everything it added.

    inj = attach(model, InjectionSpec(scheme="NVFP4", apply_during="rollout"))
    with inj.phase("rollout"):
        model.generate(...)              # injected
    with inj.phase("training"):
        loss = ...                       # not injected (apply_during="rollout"); counted as skipped
    inj.stats()                          # per module: fires / skipped per phase, weight/input/output error stats
    inj.detach()                         # every hook removed, caches freed; the model is bit-identical to before

Design: one forward pre-hook and one always-called post-hook per selected module, both handles owned
here; no global state and no patching. The pre-hook gates on the phase, swaps in the cached weight error
(`quarl.inject.weights`) and injects the input; the post-hook restores the weight and injects the output. With a
deterministic format, modules reading the same input tensor (q/k/v, gate/up) share one fake-quantized copy of it
(`Injector._shared_input`): bit-identical to quantizing it per module, at 4/7 of the cost in a Llama block.
Fused MoE experts containers get the same two hooks (swapping their 3-D expert weights for per-expert ``e(W)``)
and, for activation error, an experts implementation registered with transformers (`quarl.inject.experts`).

Phase policy. The phase is explicit (`phase` / `set_phase`), never inferred from ``module.training`` (HF and TRL
keep ``training=True`` during generation). Before any phase is set:
- ``apply_during="both"``: injection is on, and the calls are counted under the phase ``"unset"``;
- ``apply_during="rollout"`` or ``"training"``: a forward raises ``RuntimeError`` — the run cannot tell which
  phase it is in, and silently skipping (or applying) quantization is how evaluations lied: see docs/failure-modes.md.
Every call is counted either as a fire or as a skip, per phase, so telemetry always shows what happened.

Activation checkpointing: a forward that autograd re-runs inside the backward (``torch.utils.checkpoint`` with
``use_reentrant=False``, HF ``gradient_checkpointing_enable``) is injected exactly like the original -- same cached
weight, same deterministic fake quantization, so the STE gradient is bit-identical -- but is not counted or measured
again: one fire per logical forward (`in_backward`). Random error models redraw their noise there (logged once).

Hot path: the activation function is bound at attach time (`activation_fn`: the format resolved and the native
kernel bound once), the phase gate is resolved when the phase changes, and telemetry reductions run on every
``stats_every``-th call only; a W4A4 linear call costs its two fake quantizations plus a few us of hook dispatch.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from quarl.inject.activations import inject_input, inject_output
from quarl.inject.errors import ErrorModel, module_seed
from quarl.inject.plan import resolve as resolve_plan
from quarl.inject.rotation import module_rotations
from quarl.inject.experts import check_experts, install_experts
from quarl.inject.select import is_experts, select_modules
from quarl.inject.spec import ApplyDuring, InjectionSpec, Phase
from quarl.inject.telemetry import ModuleTelemetry, stats_row
from quarl.inject.weights import WeightCache, WeightEpoch, verify_enabled

logger = logging.getLogger(__name__)
UNSET = "unset"
BYPASSED = "bypassed"  # the phase name counted by `Injector.bypassed` (forwards run without injection)


class _Rng:
    """Lazily created per-device generators with one fixed seed (seeded noise, reproducible per module/role)."""

    def __init__(self, seed: int, needed: bool) -> None:
        self.seed = seed
        self.needed = needed
        self._gens: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator | None:
        if not self.needed:
            return None
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[device]


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (a checkpoint recompute runs its forward there).

    ``torch.utils.checkpoint`` (``use_reentrant=False``, as HF's ``gradient_checkpointing_enable`` uses) re-runs the
    checkpointed forward inside the backward; the graph task id is -1 exactly when no backward is executing.
    """
    return _graph_task_id() != -1


_graph_task_id = torch._C._current_graph_task_id  # bound once: it runs in every hook call


def activation_fn(error: ErrorModel, generator: _Rng,
                  global_amax: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> error(x, generator(x.device))`` with the same values and gradient semantics, resolved once.

    Formats go through ``quarl.formats.fake_quantizer`` (format and native kernel bound at attach time: the per-call
    cost at decode shapes is the kernel plus a few us). ``use_ste=False`` quantizes ``x.detach()`` (no gradient),
    as ``ErrorModel.values`` does. Noise models keep ``ErrorModel.__call__``.
    """
    if error.fmt is None:
        return lambda x: error(x, generator(x.device))
    from quarl.formats import fake_quantizer

    if error.use_ste:  # global_amax: a static input scale (`quarl.inject.input_scale`)
        return fake_quantizer(error.fmt, ste=error.ste, global_amax=global_amax)
    fq = fake_quantizer(error.fmt, global_amax=global_amax)
    return lambda x: fq(x.detach())


def epoch_of(injector: Injector, fqn: str) -> Callable[[], object]:
    """The epoch a module's weight cache compares against: the injector's, plus the merge state of every PEFT layer
    wrapped around the module (``.base_layer`` links; PEFT nests one ``ParamWrapper`` per MoE expert weight).
    PEFT's ``merge`` / ``unmerge`` write the base weight through ``.data``: a forward after either re-checks it."""
    wrappers = []
    name = fqn
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
        parent = injector.model.get_submodule(name)
        if isinstance(getattr(parent, "merged_adapters", None), list):
            wrappers.append(parent)
    epoch = injector._epoch
    if not wrappers:
        return epoch
    return lambda: (epoch.value, tuple(len(w.merged_adapters) for w in wrappers))


class _ModuleInjection:
    """Hooks and state for one selected module."""

    def __init__(self, injector: Injector, fqn: str, error: ErrorModel) -> None:
        spec = injector.spec
        self.injector = injector
        self.fqn = fqn
        self.error = error
        self.point = spec.injection_point
        self.telemetry = ModuleTelemetry()
        noisy = spec.is_noise
        self.rng = {role: _Rng(module_seed(spec.seed, f"{fqn}:{role}"), noisy) for role in ("weight", "input", "output")}
        rotation = injector._rotations.get(fqn)  # e(vR)R^T on weight and input (quarl.inject.rotation)
        weight_error = rotation.weight_error(error) if rotation else error
        self.weight = (WeightCache(weight_error, self.telemetry, self.rng["weight"], name=fqn,
                                   epoch=epoch_of(injector, fqn), verify=injector.verify_weight_cache,
                                   keep=injector.cache_weights)
                       if self.point.weight else None)
        self._input = self.point.input
        self._output = self.point.output
        apply_in = injector._input_scales.function(fqn, activation_fn, self.rng["input"])  # input_scale mode
        apply_in = rotation.wrap_input(apply_in) if rotation else apply_in
        self._apply_input = (lambda x: injector._shared_input(x, apply_in)) if error.deterministic else apply_in
        self._apply_output = activation_fn(error, self.rng["output"])
        self._active = False
        self._calls = 0
        self._warned_recompute = False

    def _measuring(self) -> bool:
        every = self.injector.stats_every
        return every > 0 and (self._calls - 1) % every == 0

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        phase, active = self.injector._gate()
        self._active = active
        # a checkpoint recompute (inside backward) repeats a forward already counted: inject it identically (the
        # gradient must not change), but count and measure it never
        counted = not in_backward()
        if not counted and not self.error.deterministic and not self._warned_recompute:
            self._warned_recompute = True
            logger.warning("quarl.inject: %s is recomputed inside backward (activation checkpointing) with a random "
                           "error model (%s): the recompute draws fresh noise, so its gradient differs from the "
                           "forward that was counted; deterministic formats recompute identically", self.fqn,
                           self.error.name)
        if not active:
            if counted:
                self.telemetry.skipped[phase] += 1
            return None
        if counted:
            self.telemetry.fires[phase] += 1
            self._calls += 1
        if self.weight is not None:
            self.weight.swap_in(module)
        if not self._input:
            return None
        if args and isinstance(args[0], torch.Tensor):  # the common call, inlined: module(x, ...)
            x = args[0]
            q = self._apply_input(x)
            args = (q, *args[1:])
        else:
            done = inject_input(args, kwargs, self._apply_input)
            if done is None:
                return None
            args, kwargs, x, q = done
        if counted and self._measuring():
            self.telemetry.measure("input", x, q, self.injector._input_row(x, q))
        return args, kwargs

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.weight is not None:
            self.weight.swap_out(module)  # always, also when the forward raised (always_call=True)
        if not (self._active and self._output):
            return None
        self._active = False
        done = inject_output(output, self._apply_output)
        if done is None:
            return None
        output, y, q = done
        if self._measuring() and not in_backward():
            self.telemetry.measure("output", y, q)
        return output


class Injector:
    """Owns the hooks, caches, phase and telemetry of one attached `InjectionSpec` (see the module docstring)."""

    def __init__(self, model: nn.Module, spec: InjectionSpec, *, phase: Phase | str | None = None,
                 stats_every: int = 16, cache_weights: bool = True) -> None:
        self.cache_weights = bool(cache_weights)
        if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 0:
            raise ValueError(f"stats_every must be an int >= 0 (0: no activation statistics), got {stats_every!r}")
        self.model = model
        self.spec = spec
        self.stats_every = stats_every
        self._phase: Phase | None = None
        self._epoch = WeightEpoch()  # moves on phase changes, optimizer steps, invalidate_weights
        self.verify_weight_cache = verify_enabled()
        self._bypassed = False  # inside `bypassed()`: every forward passes through, whatever the phase
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._modules: dict[str, _ModuleInjection] = {}
        self._last_input: tuple[torch.Tensor, tuple, torch.Tensor, dict, Callable] | None = None  # _shared_input
        self.set_phase(phase)
        self._install()
        self._handles.append(self._epoch.watch_optimizers())

    # --- installation -----------------------------------------------------------------------------------------------
    def _install(self) -> None:
        if self.spec.error_type is not None:  # None: a KV cache / attention-only spec, no linear is touched
            self._install_linears()
        if self.spec.kv_cache is not None or self.spec.attention is not None:  # last: it switches the model over
            from quarl.inject.attention import install as install_attention

            try:
                self._handles.extend(install_attention(self))  # its per-module states join self._modules
            except Exception:
                self.detach()  # the linear hooks installed above go too: a failed attach leaves no trace
                raise

    def _install_linears(self) -> None:
        # the plan's per-module formats (quarl.inject.plan); they also bind each module's input_scale mode
        self._input_scales = formats = resolve_plan(self.model, self.spec, select_modules(self.model, self.spec))
        selected = formats.selected
        point = self.spec.injection_point
        for fqn, module in selected:
            error = formats.error(fqn)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                if point.weight or point.input:
                    error.check_shape(weight.shape[1], f"{fqn} ({type(module).__name__})")
                if point.output:
                    error.check_shape(weight.shape[0], f"{fqn} ({type(module).__name__}) output")
        for error, group in formats.groups():
            check_experts([(f, m) for f, m in group if is_experts(m)], error, point)
        self._rotations = module_rotations(self.spec, selected, formats.error)
        for fqn, module in selected:
            state = _ModuleInjection(self, fqn, formats.error(fqn))
            self._modules[fqn] = state
            if is_experts(module):  # fused 3-D MoE experts: per-expert error (quarl.inject.experts)
                self._handles.extend(install_experts(self, fqn, module, state))
                continue
            self._handles.append(module.register_forward_pre_hook(state.pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(state.post, with_kwargs=True, always_call=True))
        logger.info("quarl.inject: %s on %d modules (%s, apply_during=%s, use_ste=%s)", self.spec.error_type,
                    len(selected), self.spec.injection_point.value, self.spec.apply_during.value, self.spec.use_ste)
        if not self.spec.use_ste:
            logger.warning("!!! quarl.inject: use_ste=False — the gradient through every injected %s is CUT "
                           "(detached). This reproduces the W4A4 no-STE failure (GSM8K stuck at 7-10%%) and is "
                           "only meant for that regression. Use use_ste=True for training. !!!",
                           self.spec.injection_point.value)

    def _shared_input(self, x: torch.Tensor, apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``apply(x)`` (a deterministic format), reused while consecutive modules read the very same tensor
        (q/k/v share the norm output, gate/up too): the activation is quantized once, as a fused QKV GEMM would.
        The entry holds a reference to ``x``, so its identity cannot be recycled; ``_version`` catches in-place
        writes and the grad mode is part of the key (a no-grad result has no STE node)."""
        key = (x._version, torch.is_grad_enabled())
        hit = self._last_input
        if hit is not None and hit[0] is x and hit[1] == key and hit[4] is apply:
            return hit[2]
        q = apply(x)
        self._last_input = (x, key, q, {}, apply)  # the dict caches the telemetry row of this pair
        return q

    def _input_row(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Telemetry row of (x, e(x)), computed once per shared input."""
        hit = self._last_input
        if hit is None or hit[0] is not x or hit[2] is not q:
            return stats_row(x, q)
        if "row" not in hit[3]:
            hit[3]["row"] = stats_row(x, q)
        return hit[3]["row"]

    # --- phase ------------------------------------------------------------------------------------------------------
    @property
    def current_phase(self) -> Phase | None:
        """The phase set by `set_phase` / `phase`, or None."""
        return self._phase

    def set_phase(self, phase: Phase | str | None) -> None:
        """Set the phase ('rollout' | 'training' | None) for the following forwards."""
        if phase is not None and not isinstance(phase, Phase):
            valid = [p.value for p in Phase]
            if phase not in valid:
                raise ValueError(f"unknown phase {phase!r}; valid phases: {', '.join(valid)}")
            phase = Phase(phase)
        if phase is not self._phase:
            self._epoch.bump()  # weights may have been written between phases: re-check cached ones once
        self._phase = phase
        # what `_gate` returns, resolved once per phase change instead of once per hook call
        if phase is None:
            self._gate_state = (UNSET, True) if self.spec.apply_during is ApplyDuring.BOTH else None
        else:
            self._gate_state = (phase.value, self.spec.apply_during.covers(phase))
        if self._bypassed:
            self._gate_state = (BYPASSED, False)

    @contextlib.contextmanager
    def phase(self, phase: Phase | str) -> Iterator[Injector]:
        """Context manager: run the block in ``phase``, then restore the previous phase."""
        previous = self._phase
        self.set_phase(phase)
        try:
            yield self
        finally:
            self.set_phase(previous)

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[Injector]:
        """Context manager: every forward in the block runs the model without injection (hooks pass through and
        count as ``skipped`` under the phase name ``"bypassed"``), whatever the phase, also one set inside the
        block; then restore. For a full-precision reference forward (the unquantized KL reference of ``quarl
        train``)."""
        previous = self._bypassed
        self._bypassed = True
        self.set_phase(self._phase)
        try:
            yield self
        finally:
            self._bypassed = previous
            self.set_phase(self._phase)

    def _gate(self) -> tuple[str, bool]:
        """(phase name, active?) for a forward starting now (resolved by `set_phase`)."""
        state = self._gate_state
        if state is None:
            raise RuntimeError(
                f"quarl.inject: apply_during={self.spec.apply_during.value!r} but no phase is set; wrap the forward "
                "in `with injector.phase('rollout'):` / `('training')` or call injector.set_phase(...)")
        return state

    # --- weight cache -----------------------------------------------------------------------------------------------
    def invalidate_weights(self) -> None:
        """Drop every cached quantized weight: the next forward of each module recomputes ``e(W)``.

        Call it after writing weights in a way PyTorch does not version (``param.data.copy_(...)``,
        ``param.data += ...``) in the middle of a phase; between phases and after optimizer steps quarl re-checks
        cached weights by itself (`quarl.inject.weights`). quarl's TRL + vLLM sync and verl worker extension call it
        after every weight sync."""
        self._epoch.bump()
        for state in self._modules.values():
            if state.weight is not None:
                state.weight.clear()

    # --- telemetry --------------------------------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Qualified names of the injected modules."""
        return list(self._modules)

    def stats(self) -> dict[str, dict]:
        """Per module: ``fires`` / ``skipped`` per phase, ``weight_computations``, and per role ('weight',
        'input', 'output') ``rel_err``, ``sqnr_db``, ``zero_frac``, ``amax``, ``outlier``, ``measured``, and the
        ``format`` applied (a plan may give modules another format; `formats` also lists those it keeps unquantized)."""
        applied = self.formats()
        return {fqn: {"format": applied.get(fqn, self.spec.error_type), **state.telemetry.summary()}
                for fqn, state in self._modules.items()}

    def formats(self) -> dict[str, str]:
        """Per module the spec or its plan names: the format actually applied, or ``"none (plan rule i: ...)"`` for a
        module the plan keeps in full precision (`quarl.inject.plan`)."""
        return dict(self._input_scales.applied) if hasattr(self, "_input_scales") else {}

    def input_scales(self) -> dict[str, str]:
        """Per module whose input is injected: the activation-scale mode actually bound (``input_scale``; static:
        with its calibrated amax), e.g. ``"static (calibrated amax 3.25)"``, ``"per-token global scale"``."""
        if not hasattr(self, "_input_scales") or not self.spec.injection_point.input:
            return {}
        return dict(self._input_scales.modes)

    def never_fired(self, phase: Phase | str | None = None) -> list[str]:
        """Modules whose injection never fired (in ``phase``, or in any phase)."""
        key = phase.value if isinstance(phase, Phase) else phase
        return [fqn for fqn, s in self._modules.items()
                if (s.telemetry.fires.get(key, 0) if key else sum(s.telemetry.fires.values())) == 0]

    def check_fired(self, phase: Phase | str | None = None) -> None:
        """Raise RuntimeError naming every declared injection that never fired."""
        missing = self.never_fired(phase)
        if missing:
            where = f" in phase {phase!r}" if phase else ""
            raise RuntimeError(f"quarl.inject: {len(missing)}/{len(self._modules)} declared injections never "
                               f"fired{where}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")

    def reset_stats(self) -> None:
        """Zero all counters and error statistics (hooks and caches stay)."""
        for state in self._modules.values():
            state.telemetry = ModuleTelemetry()
            if state.weight is not None:
                state.weight.telemetry = state.telemetry
                state.weight.clear()

    # --- lifetime ---------------------------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """True until `detach` ran."""
        return bool(self._handles)

    def detach(self) -> None:
        """Remove every hook and free every cache. Idempotent. The model was never modified, so it is bit-identical
        to before `attach` (parameters, buffers, outputs)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None
        for fqn, state in self._modules.items():
            if state.weight is not None:
                state.weight.swap_out(self.model.get_submodule(fqn))
                state.weight.clear()

    def __enter__(self) -> Injector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def attach(model: nn.Module, spec: InjectionSpec, *, phase: Phase | str | None = None,
           stats_every: int = 16, cache_weights: bool = True) -> Injector:
    """Attach ``spec`` to ``model``; returns the `Injector` that owns every hook (also a context manager).

    Args:
        model: any ``nn.Module`` (plain, Hugging Face, PEFT-wrapped).
        spec: the injection (validated at construction).
        phase: initial phase ('rollout' | 'training'); see the module docstring for the policy when None.
        stats_every: measure activation error statistics on the first injected call of each module and every
            n-th after it (default 16: the reductions cost about as much as the fake quantization itself on CPU;
            1 = every call; 0 = never: fires are still counted, the hook path does no reductions at all). Weight
            statistics are measured once per weight version regardless.
        cache_weights: keep ``e(W)`` between forwards (default). The cache holds one full-size quantized copy per
            injected weight, per process: under FSDP2 that is the unsharded size on every rank (often more than
            the rank's own shard). ``False`` re-quantizes every weight on every forward instead: no extra memory,
            one quantization per weight per forward.

    Raises:
        ValueError: the spec matches zero modules, or a format cannot handle a selected module's features.
    """
    return Injector(model, spec, phase=phase, stats_every=stats_every, cache_weights=cache_weights)
