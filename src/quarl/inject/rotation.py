"""Randomized Hadamard rotations of both operands of an injected linear: ``injection.rotation``.

Why. A 4-bit block format spends one scale on each block; one outlier in a block flattens every other element of it.
Rotating the reduction dimension by an orthogonal ``R`` spreads outliers across the block before the scale is chosen,
and costs nothing in exact arithmetic because ``(x R)(W R)^T = x R R^T W^T = x W^T``. Deployed recipes do it two ways:

    rotation  R (K x K, K = in_features)                                what ships it
    none      identity (default)
    block     block-diagonal: one diag(s_b) H_b / sqrt(b) per block of   MR-GPTQ (arXiv 2509.23202): a Hadamard of
              b = the format's block size (32 for MX, 16 for NVFP4)      the quantization group, on weights and inputs
    full      diag(s) H_K / sqrt(K), H_K a Hadamard of the whole input   QuaRot (arXiv 2404.00456): the inverse is
              dimension                                                 folded into the weight

``s`` are random signs (+-1) drawn per module from ``crc32(f"{seed}:{fqn}:rotation")`` (the spec's ``seed``), so a
module's rotation does not depend on which other modules exist. ``H_n`` is a Sylvester matrix for ``n = 2^k``; other
orders are ``H_{2^k} (x) H_m`` (Kronecker) with ``H_m`` from Paley's constructions: type I for ``m = q + 1``, ``q`` a
prime ``= 3 mod 4`` (12, 20, 24, 44, 48, ...), type II for ``m = 2(q + 1)``, ``q`` a prime ``= 1 mod 4`` (28, 36,
60, ...). An input dimension with no such factorisation is refused, naming it.

Basis convention (the one of the formats' 16-wide ``hadamard`` option, `quarl.formats.hadamard`): each fake-quantized
operand is returned in the original basis, ``e_R(v) = e(v R) R^T``; the injected linear computes
``F.linear(e_R(x), e_R(W)) = e(xR) R^T R e(WR)^T = e(xR) e(WR)^T``, the rotated low-precision GEMM, up to the fp32
rounding of the two extra products. Everything downstream stays a drop-in: the cached weight is ``e_R(W)`` (rotated,
quantized and rotated back once per weight version inside `quarl.inject.weights.WeightCache`, never per forward), the
telemetry compares ``x`` with ``e_R(x)`` (an orthogonal ``R`` preserves norms, so that is the error of ``e`` in the
rotated basis), and the straight-through gradient is ``g R I R^T = g``. Rotations are computed in fp32 and the results
cast back to the operand's dtype.

Cost per forward: two rotations per injected input, each one ``(b, b)`` product per tile (block), or for a full
rotation ``H_{2^k} (x) H_m`` applied in that structure (an ``(m, m)`` product and a fast Walsh-Hadamard transform);
the weight's rotation is paid once per weight version. Each module has its own signs, so modules that read the same
tensor (q/k/v) no longer share one fake-quantized copy of it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quarl import configio

if TYPE_CHECKING:  # spec.py imports this module (validation); the runtime objects arrive as arguments
    from quarl.inject.errors import ErrorModel
    from quarl.inject.spec import InjectionSpec

logger = logging.getLogger(__name__)
ROTATIONS = ("none", "block", "full")
SMALL_BLOCK = 64  # the largest Sylvester factor applied as one dense product (see `Rotation`)


# --- Hadamard matrices ----------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character mod the prime ``q`` (``chi(0) = 0``)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx.unsqueeze(0) - idx.unsqueeze(1)) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A +-1 Hadamard matrix of order ``m`` from Paley's construction I or II, or None when neither applies."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):  # type I: H = I + [[0, 1^T], [-1, Q]] (Q skew-symmetric)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and q % 4 == 1 and _is_prime(q):  # type II: C (x) [[1,-1],[-1,-1]] + I (x) [[1,1],[1,-1]]
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)  # symmetric conference matrix
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


@functools.lru_cache(maxsize=32)
def _factor(n: int) -> tuple[int, torch.Tensor]:
    """``(p, H_m)`` with ``n = p * m``, ``p`` a power of two and ``H_m`` a Paley matrix (``m = 1``: ``[[1]]``), ``m``
    as small as possible; ValueError naming ``n`` when there is none."""
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs an order >= 1, got {n}")
    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(k, -1, -1):
        m = n >> j
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else (_paley(m) if m > 2 else None)
        if base is not None:
            if not torch.equal(base @ base.T, m * torch.eye(m, dtype=torch.float64)):  # never rotate by a bug
                raise AssertionError(f"Paley construction of order {m} is not orthogonal")
            return 1 << j, base
    raise ValueError(f"no Hadamard matrix of order {n} is known to quarl: full rotation needs the input dimension "
                     "to be 2^k, or 2^k times a Paley order (12, 20, 24, 28, 36, ...); exclude that module or use "
                     "rotation='block'")


@functools.lru_cache(maxsize=32)
def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (entries +-1, ``H H^T = n I``), fp64, on the CPU.

    ``n = 2^k``: Sylvester; otherwise ``H_{2^k} (x) H_m`` (Sylvester doublings of the smallest Paley order ``m``, see
    the module docstring). Cached; callers must not modify the result.

    Raises:
        ValueError: ``n`` has no factorisation ``2^k * m`` with a Paley order ``m`` (the message names ``n``).
    """
    p, h = _factor(n)
    while h.shape[0] < n:  # [[H, H], [H, -H]] = H_2 (x) H
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if not torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)):  # a construction bug must never rotate
        raise AssertionError(f"Hadamard construction of order {n} is not orthogonal")
    return h


def _split(b: int) -> list[int]:
    """``b = d1 * d2`` with ``d1`` a power of two and ``d1 + d2`` smallest (``[b]`` for ``b <= SMALL_BLOCK``), so that
    ``H_b = H_{d1} (x) H_{d2}`` (both as `hadamard` builds them: Sylvester doublings of the same Paley order)."""
    if b <= SMALL_BLOCK:
        return [b]
    p, _ = _factor(b)
    splits = [(1 << a, b >> a) for a in range(p.bit_length())]
    d1, d2 = min(splits, key=sum)
    return [d1, d2] if d1 > 1 else [d2]


# --- one module's rotation ------------------------------------------------------------------------------------------


class Rotation:
    """``R = diag(signs) blockdiag(H_b, ..., H_b) / sqrt(b)`` along the last dim (``b = K`` for a full rotation).

    ``H_b`` is applied in its Kronecker structure ``H_b = H_{d1} (x) H_{d2}`` (``d1`` a power of two, both near
    ``sqrt(b)``; one factor for ``b <= SMALL_BLOCK``): a tile viewed as a (d1, d2) matrix ``X`` becomes
    ``H_{d1}^T X H_{d2}``, O(d1 + d2) products per element instead of O(b): a full rotation of K = 4096 costs
    2 x 64 per element, not 4096.

    Args:
        features: K, the input dimension of the linear.
        block: b (divides K).
        signs: (K,) fp32 tensor of +-1.
    """

    def __init__(self, features: int, block: int, signs: torch.Tensor) -> None:
        if features % block:
            raise ValueError(f"a rotation of block {block} needs the input dimension to be a multiple of it, "
                             f"got {features}")
        self.features = features
        self.block = block
        self.signs = signs.to(torch.float32)  # (K,)
        self._sizes = _split(block)
        self._base = [hadamard(d) / math.sqrt(d) for d in self._sizes]  # fp64, orthonormal
        self._h: dict[torch.device, list[torch.Tensor]] = {}  # device -> the factors in fp32

    def _factors(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._h:
            self._h[device] = [f.to(torch.float32).to(device) for f in self._base]
        return self._h[device]

    def _signs(self, device: torch.device) -> torch.Tensor:
        if self.signs.device != device:
            self.signs = self.signs.to(device)
        return self.signs

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``x H_b / sqrt(b)`` (or ``H_b^T``) tile by tile along the last dim; fp32 (…, K)."""
        factors = self._factors(x.device)
        if transpose:
            factors = [f.T for f in factors]
        t = x.reshape(-1, self.block)  # (N, b): every tile a row
        if len(factors) == 2:  # tile as (d1, d2): H_{d1}^T X first, from the left (a batched product)
            t = factors[0].T @ t.reshape(-1, *self._sizes)  # (N, d1, d2)
        t = t.reshape(-1, self._sizes[-1]) @ factors[-1]  # (N * d1, d2)
        return t.reshape(x.shape)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` along the last dim, fp32 (…, K) -> (…, K)."""
        return self._apply(x.float() * self._signs(x.device), transpose=False)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``y R^T`` along the last dim, fp32 (…, K) -> (…, K)."""
        return self._apply(y.float(), transpose=True) * self._signs(y.device)

    def dense(self) -> torch.Tensor:
        """The K x K matrix R (fp32; for tests and inspection)."""
        return self.rotate(torch.eye(self.features))

    def wrap_input(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``x -> e(x R) R^T`` in ``x``'s dtype, for an input error function ``e`` (gradient flows through R)."""
        return lambda x: self.unrotate(fn(self.rotate(x))).to(x.dtype)

    def weight_error(self, error: ErrorModel) -> RotatedError:
        """``error`` in the rotated basis, for the weight cache: ``W -> e(W R) R^T``."""
        return RotatedError(error, self)


@dataclass(frozen=True)
class RotatedError:
    """An `ErrorModel` applied in a rotated basis, ``W -> e(W R) R^T`` (what `WeightCache` caches)."""

    base: Any  # the ErrorModel
    rotation: Rotation

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def fmt(self) -> Any:
        return self.base.fmt

    @property
    def deterministic(self) -> bool:
        return self.base.deterministic

    @property
    def use_ste(self) -> bool:
        return self.base.use_ste

    def values(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``e(x R) R^T`` without autograd, in ``x``'s dtype."""
        with torch.no_grad():
            rot = self.rotation
            return rot.unrotate(self.base.values(rot.rotate(x.detach()), generator)).to(x.dtype)


# --- spec validation and construction -------------------------------------------------------------------------------
def validate(spec: InjectionSpec) -> None:
    """Check ``spec.rotation`` (called by ``InjectionSpec.__post_init__``).

    Raises:
        ValueError: an unknown mode (naming the nearest), a rotation without a linear error, on output injection
            only, ``block`` on a format without blocks or on a noise model, with static (calibrated) input scales,
            or combined with the formats' ``hadamard`` option (two rotations).
    """
    mode = spec.rotation
    if not isinstance(mode, str) or mode not in ROTATIONS:
        raise configio.unknown_key_error(str(mode), ROTATIONS, "InjectionSpec.rotation")
    if mode == "none":
        return
    if spec.error_type is None:
        raise ValueError(f"rotation={mode!r} rotates the operands of injected linears; this spec injects none")
    if spec.injection_point.output and not spec.injection_point.input and not spec.injection_point.weight:
        raise ValueError(f"rotation={mode!r} rotates the reduction dimension of weight and input; injection_point="
                         "'output' quantizes neither (use 'weight', 'input' or 'both')")
    if mode == "block" and spec.is_noise:
        raise ValueError(f"rotation='block' rotates each block of the format's scale; the noise model "
                         f"{spec.error_type!r} has no blocks (use rotation='full')")
    if spec.input_scale == "static":
        raise ValueError(f"rotation={mode!r} with input_scale='static': the calibrated amaxes are of the unrotated "
                         "input, not of x R; use input_scale='dynamic' or 'per_token'")
    if spec.format_options.get("hadamard"):
        raise ValueError(f"rotation={mode!r} with format_options.hadamard=true would rotate twice; choose one")
    if mode == "block":
        from quarl.formats import get_format

        options = {k: v for k, v in spec.format_options.items() if k != "ste"}
        if not get_format(spec.error_type, **options).block_size:
            raise ValueError(f"rotation='block' needs a block format (mxfp4: 32, nvfp4: 16, int4/nf4: their group); "
                             f"{spec.error_type!r} scales per tensor / channel / token; use rotation='full'")


def module_rotations(spec: InjectionSpec, selected: list[tuple[str, torch.nn.Module]],
                     error_of: Callable[[str], ErrorModel]) -> dict[str, Rotation]:
    """One `Rotation` per selected module (none when ``spec.rotation == 'none'``), seeded per module from ``spec.seed``.

    Args:
        spec: the validated spec.
        selected: the injected ``(fqn, module)`` pairs; each needs a 2-D ``weight`` (its input dimension).
        error_of: the error model of a module (its format's block size is the block of ``rotation='block'``).

    Raises:
        ValueError: fused MoE experts or a module without a 2-D weight; an input dimension that is not a multiple of
            the block, or (full) has no known Hadamard order; a module whose format has no blocks (block).
    """
    from quarl.inject.errors import module_seed

    if spec.rotation == "none":
        return {}
    out = {}
    for fqn, module in selected:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{fqn} ({type(module).__name__}): rotation={spec.rotation!r} needs a linear with a 2-D "
                             "weight (fused MoE experts are not rotated by quarl); exclude it or use rotation='none'")
        features = weight.shape[1]
        fmt = error_of(fqn).fmt
        block = features if spec.rotation == "full" else getattr(fmt, "block_size", 0)
        if not block:
            raise ValueError(f"{fqn}: rotation='block' needs a block format, and this module's is "
                             f"{error_of(fqn).name!r}")
        try:
            if spec.rotation == "full":
                _factor(features)
            elif features % block:
                raise ValueError(f"rotation='block' with block {block} needs the input dimension to be a multiple "
                                 f"of it, got {features}")
        except ValueError as exc:
            raise ValueError(f"{fqn}: {exc}") from None
        gen = torch.Generator().manual_seed(module_seed(spec.seed, f"{fqn}:rotation"))
        signs = torch.randint(0, 2, (features,), generator=gen).mul_(2).sub_(1)
        out[fqn] = Rotation(features, block, signs)
    logger.info("quarl.inject: %s randomized Hadamard rotation on %d modules", spec.rotation, len(out))
    return out
