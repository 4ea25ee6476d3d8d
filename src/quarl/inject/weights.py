"""Weight injection: ``W -> e(W)`` computed once per weight version, swapped in only for the module's forward.

Why. Re-quantizing and cloning every weight on every forward (and restoring it only after a backward that
inference never runs) is slow and leaks quantized weights into evaluation. Here ``e(W)`` is computed once and reused
for as long as ``W`` provably did not change.

The cache and when it is recomputed. A cached entry is reused only while all of these hold:

- the key ``(param._version, param.data_ptr(), dtype, device, shape)`` is unchanged. PyTorch bumps ``_version`` on
  every in-place write through the Parameter itself (``optimizer.step()``, ``param.copy_``, ``load_state_dict``)
  and ``param.data = ...`` changes the data pointer;
- the injector's *epoch* is unchanged. The epoch moves on every phase change, on every optimizer step of any
  ``torch.optim`` optimizer (a process-wide post-step hook the injector owns and removes on ``detach``), on
  `Injector.invalidate_weights`, and, for the ``base_layer`` of a PEFT LoRA layer, when adapters are merged or
  unmerged. This catches the writes that bump neither version nor pointer -- ``param.data.copy_(...)``,
  ``param.data += ...`` -- which is how PEFT's ``merge_adapter`` / ``unmerge_adapter``, FSDP2's all-gather into a
  reused buffer and vLLM's weight loaders write. When the epoch moved, a deterministic format re-quantizes ``W``
  (one quantization per phase: measured cheaper on a CPU than any exact checksum of ``W``); a random error model
  keeps its draw if the weight's 64-bit content checksum (`checksum`) is unchanged, so its noise is resampled once
  per weight version. Forwards inside one phase (a whole rollout) never pay either.

What it cannot see: a ``.data`` write *inside* one phase with no optimizer step in between (a custom weight sync in
the middle of a rollout). Code that does that calls ``injector.invalidate_weights()`` afterwards; quarl's own
integrations (the TRL + vLLM weight sync, the verl worker extension) do it for you. To prove a pipeline never serves
a stale entry, set ``QUARL_VERIFY_WEIGHT_CACHE=1``: every cache hit then compares ``W`` bit for bit with a copy
taken when ``e(W)`` was computed and raises `StaleWeightCacheError` naming the module (quarl's test suite runs with
it on; it doubles weight memory, so it is a debugging mode).

Only ``e(W)`` is stored (one tensor the size of W, in W's dtype). The full-precision weight stays the module's own
Parameter; nothing is copied or modified in place, so detaching restores the model bit-exactly by construction.
The swap: a forward pre-hook puts the cached tensor in ``module._parameters["weight"]`` for the duration of the
module's forward (the mechanism ``torch.func.functional_call`` uses), and a post-hook registered with
``always_call=True`` puts the Parameter back even when the forward raises.

Gradients: when the Parameter requires grad and ``use_ste=True``, the swapped-in tensor is
``pass_through(W, e(W))``: forward value e(W), identity gradient to W (a zero-copy view per forward). Input
gradients are exact for the injected forward (dL/dx = g·e(W)). Frozen weights (LoRA base) use the cached tensor.
Stochastic error models resample once per cached value, i.e. once per weight version.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from quarl.inject.errors import ErrorModel, pass_through
from quarl.inject.telemetry import ModuleTelemetry

VERIFY_ENV = "QUARL_VERIFY_WEIGHT_CACHE"
_Key = tuple[int, int, torch.dtype, torch.device, tuple[int, ...]]
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# odd 64-bit constants (golden-ratio and splitmix64 increments): position weights of the checksum
_ROW_MUL, _COL_MUL = -7046029254386353131, -4658895280553007687


class StaleWeightCacheError(RuntimeError):
    """A cached quantized weight no longer matches its weight (raised only in verify mode)."""


def verify_enabled() -> bool:
    """True when ``QUARL_VERIFY_WEIGHT_CACHE`` is set to a non-empty value other than ``0``."""
    return os.environ.get(VERIFY_ENV, "") not in ("", "0")


def weight_key(param: torch.Tensor) -> _Key:
    """Identity of one version of a weight's values (``param.shape`` is already a tuple: ``torch.Size``)."""
    return (param._version, param.data_ptr(), param.dtype, param.device, param.shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw bit patterns as integers of the same width (NaN payloads and -0.0 included)."""
    t = t.detach()
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` would call two NaNs different and -0.0 equal to 0.0)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def checksum(t: torch.Tensor) -> int:
    """A position-weighted 64-bit checksum of ``t``'s bits: sum over elements of ``bits * (r·A + c·B | 1)`` mod 2^64.

    Any single changed element changes it (its weight is odd, hence invertible mod 2^64); several changes cancel
    only if their weighted differences sum to 0 mod 2^64, which rounding drift (merge then unmerge) does not
    arrange. One pass over ``t`` plus an int64 temporary; no Python loop.
    """
    b = _bits(t).reshape(t.shape[0] if t.dim() > 1 else 1, -1).to(torch.int64)  # (R, C)
    rows = torch.arange(b.shape[0], device=b.device, dtype=torch.int64).mul_(_ROW_MUL).unsqueeze(1)
    cols = torch.arange(b.shape[1], device=b.device, dtype=torch.int64).mul_(_COL_MUL)
    return int(b.mul_((rows + cols).bitwise_or_(1)).sum())


class WeightEpoch:
    """The counter a `WeightCache` compares against: it moves whenever cached weights must be re-checked.

    Calling it returns the current value. `watch_optimizers` moves it after every step of any ``torch.optim``
    optimizer (FSDP2 writes stepped values into its gather buffers without a version bump); the returned handle is
    the caller's to remove, and the hook holds the epoch weakly.
    """

    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value

    def bump(self) -> None:
        self.value += 1

    def watch_optimizers(self) -> torch.utils.hooks.RemovableHandle:
        ref = weakref.ref(self)

        def bump(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            epoch = ref()
            if epoch is not None:
                epoch.bump()

        return register_optimizer_step_post_hook(bump)


class WeightCache:
    """The cached ``e(W)`` of one module and the swap in/out of its ``weight`` entry.

    ``epoch`` returns the owning injector's epoch (see the module docstring); ``verify`` turns on the bitwise check
    of every hit (`StaleWeightCacheError`); ``keep=False`` stores nothing and recomputes ``e(W)`` on every call.
    """

    def __init__(self, error: ErrorModel, telemetry: ModuleTelemetry,
                 generator: Callable[[torch.device], torch.Generator | None], *, name: str = "<module>",
                 epoch: Callable[[], int] = lambda: 0, verify: bool = False, keep: bool = True) -> None:
        self.error = error
        self.telemetry = telemetry
        self.generator = generator
        self.name = name
        self.epoch = epoch
        self.verify = verify
        self.keep = keep  # False: nothing is stored, e(W) is recomputed on every forward (no extra memory)
        self._key: _Key | None = None
        self._epoch = -1  # the epoch at which the entry was last proven fresh
        self._checksum: int | None = None
        self._snapshot: torch.Tensor | None = None  # verify mode: W's bits when e(W) was computed
        self._value: torch.Tensor | None = None
        self._saved: nn.Parameter | None = None  # the Parameter while e(W) is swapped in

    def _fresh(self, param: torch.Tensor, key: _Key) -> bool:
        """True when the cached entry still belongs to ``param``'s current values."""
        if key != self._key:
            return False
        epoch = self.epoch()
        if epoch != self._epoch:
            # a deterministic format re-quantizes (cheaper than any checksum on a CPU: int64 reductions are slow);
            # a random error model keeps its draw when the checksum proves the weight unchanged
            if self.error.deterministic or checksum(param) != self._checksum:
                return False
            self._epoch = epoch
        return True

    def value(self, param: torch.Tensor) -> torch.Tensor:
        """``e(W)`` for the current values of ``param`` (recomputed only when the weight changed)."""
        if not self.keep:
            with torch.no_grad():
                value = self.error.values(param, self.generator(param.device))
            self.telemetry.weight_computations += 1
            return value
        key = weight_key(param)
        if self._fresh(param, key):
            if self.verify and not same_bits(param, self._snapshot):
                raise StaleWeightCacheError(
                    f"quarl.inject: the cached quantized weight of {self.name} is stale: its weight changed without a "
                    "version bump (a write through `.data`, e.g. `param.data.copy_(...)`, inside one phase). Call "
                    "`injector.invalidate_weights()` after writing weights that way. (Raised because "
                    f"{VERIFY_ENV} is set.)")
            return self._value
        with torch.no_grad():
            self._value = self.error.values(param, self.generator(param.device))
            self._checksum = None if self.error.deterministic else checksum(param)
            self._snapshot = param.detach().clone() if self.verify else None
        self._key, self._epoch = key, self.epoch()
        self.telemetry.weight_computations += 1
        self.telemetry.measure("weight", param, self._value)
        return self._value

    def effective(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the forward uses: e(W), with an identity gradient to W when that is wanted."""
        value = self.value(param)
        return pass_through(param, value) if self.error.use_ste else value

    def swap_in(self, module: nn.Module) -> None:
        """Replace ``module.weight`` by its effective weight until `swap_out`."""
        if self._saved is not None:  # re-entrant call: already swapped
            return
        param = module._parameters["weight"]
        self._saved = param
        module._parameters["weight"] = self.effective(param)

    def swap_out(self, module: nn.Module) -> None:
        """Put the original Parameter back (no-op when nothing is swapped in)."""
        if self._saved is not None:
            module._parameters["weight"] = self._saved
            self._saved = None

    def clear(self) -> None:
        """Drop the cached tensor (frees its memory); the next forward recomputes it."""
        self._key = self._value = self._checksum = self._snapshot = None
        self._epoch = -1
