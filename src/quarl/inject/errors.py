"""Error models: the tensor -> tensor functions an injection applies, and their gradient semantics.

Models (``s`` = ``error_scale``, ``N`` = standard normal from a seeded ``torch.Generator``; all computed in fp32 and
returned in the input's dtype):

    format             x -> quarl.formats.fake_quantize(x, fmt)         (RNE, saturating; see quarl.formats)
    relative_gaussian  x -> x · (1 + s·N)                                 multiplicative, error ∝ |x|
    absolute_gaussian  x -> x + s·N                                       additive, fixed magnitude
    systematic_bias    x -> x + s·sign(x)                                 rounding-direction bias (verl fork)
    deadzone           x -> x · [|x| >= s·max|x|]                         small values flushed to zero

Gradients. With ``use_ste=True`` every model is a straight-through estimator: d e(x)/dx := I. Formats use the STE
of `quarl.formats.fake_quantize` (one autograd.Function, owned by formats); the noise models and the cached weight
path use `pass_through`, whose forward returns an already-computed tensor and whose backward is the identity — it
is the same estimator, applied to a value computed once (a cached weight) instead of recomputed in the graph.
With ``use_ste=False`` the error is applied to ``x.detach()``: the gradient through the injected path is None.
That reproduces the W4A4 failure (activation fake-quant under no_grad: GSM8K stuck at 7-10%)
and exists only for that regression; `quarl.inject.attach` logs a loud warning.

Seeding: each injected module gets its own generator seeded from ``crc32(f"{seed}:{fqn}")``, so the noise a module
sees does not depend on which other modules exist or run first.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from quarl.inject.spec import InjectionSpec

logger = logging.getLogger(__name__)


class _PassThrough(torch.autograd.Function):
    """Forward: return the precomputed ``y``; backward: identity to ``x`` (straight-through)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)  # a view: the cached tensor itself never gets a grad_fn

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def pass_through(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in the forward pass, identity gradient to ``x`` (shapes and dtypes must match).

    Args:
        x: the clean tensor (param or activation) that should receive the gradient.
        y: the error-injected values, computed without grad.
    """
    return _PassThrough.apply(x, y) if x.requires_grad and torch.is_grad_enabled() else y


def relative_gaussian(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x · (1 + scale·N(0,1))`` in fp32, returned in x's dtype."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (x.float() * (1.0 + scale * noise)).to(x.dtype)


def absolute_gaussian(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + scale·N(0,1)`` in fp32, returned in x's dtype."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (x.float() + scale * noise).to(x.dtype)


def systematic_bias(x: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + scale·sign(x)`` (deterministic; ``generator`` unused), returned in x's dtype."""
    return (x.float() + scale * torch.sign(x.float())).to(x.dtype)


def deadzone(x: torch.Tensor, threshold: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero every element with ``|x| < threshold·max|x|`` (max over the whole tensor); others unchanged."""
    if x.numel() == 0:
        return x.clone()
    keep = x.abs() >= threshold * x.abs().amax()
    return torch.where(keep, x, torch.zeros_like(x))


_NOISE = {
    "relative_gaussian": relative_gaussian,
    "absolute_gaussian": absolute_gaussian,
    "systematic_bias": systematic_bias,
    "deadzone": deadzone,
}


def module_seed(seed: int, fqn: str) -> int:
    """Deterministic per-module seed: ``crc32(f"{seed}:{fqn}")``."""
    return zlib.crc32(f"{seed}:{fqn}".encode())


@dataclass(frozen=True)
class ErrorModel:
    """One spec's error function with its gradient semantics (see the module docstring)."""

    name: str  # error_type
    scale: float | None  # noise models only
    fmt: Any  # the quarl.formats format object, or None for noise models
    use_ste: bool
    ste: str = "identity"  # formats' STE variant for activations: identity | clipped (weights: identity)

    @classmethod
    def from_spec(cls, spec: InjectionSpec) -> ErrorModel:
        """Build from a validated spec (``format_options["ste"]`` selects the formats STE variant)."""
        if spec.is_noise:
            return cls(spec.error_type, spec.error_scale, None, spec.use_ste)
        from quarl.formats import get_format

        options = dict(spec.format_options)
        ste = options.pop("ste", "identity")
        ste = getattr(ste, "value", ste)  # a SteMode member or its string value
        return cls(spec.error_type, None, get_format(spec.error_type, **options), spec.use_ste, ste)

    @property
    def deterministic(self) -> bool:
        """True when e(x) depends on x alone (formats with deterministic rounding), so one result can be shared
        by every module that reads the same tensor (q/k/v, gate/up)."""
        rounding = getattr(self.fmt, "rounding", None)
        return self.fmt is not None and getattr(rounding, "value", rounding) != "stochastic"

    def values(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The error-injected values of ``x``, without autograd (for caching and telemetry)."""
        with torch.no_grad():
            if self.fmt is not None:
                from quarl.formats import fake_quantize

                return fake_quantize(x.detach(), self.fmt)
            return _NOISE[self.name](x.detach(), self.scale, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Apply to an activation with the spec's gradient semantics (STE, or a cut when ``use_ste=False``)."""
        if not self.use_ste:
            return self.values(x, generator)
        if self.fmt is not None:
            from quarl.formats import fake_quantize

            return fake_quantize(x, self.fmt, ste=self.ste)  # formats' own STE
        return pass_through(x, self.values(x, generator))

    def check_shape(self, features: int, where: str) -> None:
        """Apply the format to one zero row of width ``features`` at attach time, so a format that rejects the
        shape fails with the module named instead of deep inside a forward pass. quarl.formats' policy for a
        block size that does not divide the features is to zero-pad the last block; that is logged per module."""
        if self.fmt is None:
            return
        try:
            self.values(torch.zeros(1, features))
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{where}: {self.name} cannot quantize a last dim of {features}: {exc}") from exc
        block = getattr(self.fmt, "block_size", 0)
        if block and features % block:
            logger.warning("%s: %d features is not a multiple of %s block_size %d; the last block is zero-padded "
                           "for its scale (quarl.formats policy)", where, features, self.name, block)
