"""Weight injection: ``W -> e(W)`` computed once per weight version, swapped in only for the module's forward.

Why. The verl fork re-quantized and cloned every weight on every forward, and restored the originals only after a
backward that inference never runs (FIELD_NOTES §2 item 7). Here:

- ``e(W)`` is cached per module, keyed on ``(param._version, param.data_ptr(), dtype, device, shape)``. PyTorch
  bumps ``_version`` on every in-place write (``optimizer.step()``, ``copy_``, ``load_state_dict``) and
  ``param.data = ...`` changes the data pointer, so the cache is invalidated exactly when the weight changes, and a
  rollout of N forwards quantizes each weight once. Stochastic error models therefore resample once per weight
  version (QeRL resamples once per optimizer step, too).
- Only ``e(W)`` is stored (one tensor the size of W, in W's dtype). The full-precision weight stays the module's own
  Parameter; nothing is copied or modified in place, so detaching restores the model bit-exactly by construction.
- The swap: a forward pre-hook puts the cached tensor in ``module._parameters["weight"]`` for the duration of the
  module's forward (the same mechanism ``torch.func.functional_call`` uses), and a post-hook registered with
  ``always_call=True`` puts the Parameter back even when the forward raises.
- Gradients: when the Parameter requires grad and ``use_ste=True``, the swapped-in tensor is
  ``pass_through(W, e(W))``: forward value e(W), identity gradient to W (a zero-copy view per forward). Input
  gradients are exact for the injected forward (dL/dx = g·e(W)). Frozen weights (LoRA base) just use the cached
  tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quarl.inject.errors import ErrorModel, pass_through
from quarl.inject.telemetry import ModuleTelemetry

_Key = tuple[int, int, torch.dtype, torch.device, tuple[int, ...]]


def weight_key(param: torch.Tensor) -> _Key:
    """Identity of one version of a weight's values (``param.shape`` is already a tuple: ``torch.Size``)."""
    return (param._version, param.data_ptr(), param.dtype, param.device, param.shape)


class WeightCache:
    """The cached ``e(W)`` of one module and the swap in/out of its ``weight`` entry."""

    def __init__(self, error: ErrorModel, telemetry: ModuleTelemetry,
                 generator: Callable[[torch.device], torch.Generator | None]) -> None:
        self.error = error
        self.telemetry = telemetry
        self.generator = generator
        self._key: _Key | None = None
        self._value: torch.Tensor | None = None
        self._saved: nn.Parameter | None = None  # the Parameter while e(W) is swapped in

    def value(self, param: torch.Tensor) -> torch.Tensor:
        """``e(W)`` for the current version of ``param`` (recomputed only when the weight changed)."""
        key = weight_key(param)
        if key != self._key:
            self._value = self.error.values(param, self.generator(param.device))
            self._key = key
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
        """Drop the cached tensor (frees its memory)."""
        self._key = self._value = None
