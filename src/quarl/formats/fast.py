"""Compiled fast path for ``fake_quantize``: the eager numerics, fused by ``torch.compile`` (Inductor).

Why: eager fake quantization makes ~20 passes over memory; on a 4096x4096 fp32 CPU tensor the references take 15-19x
a ``clone()``. Compiling the very same eager function fuses it into a few loops (target: <= 3x a clone).

Contract: bit-identical to ``fake_quantize_eager`` (tests/formats/test_fast.py compares with ``torch.equal`` and
NaN positions, including ties, zeros, saturation and non-finite blocks). Inductor does not reassociate or contract
fp32 arithmetic by default, and every operation here is exact or a single correctly rounded IEEE op.

When it is used: CPU tensors with at least :data:`MIN_NUMEL` elements, deterministic rounding, no Hadamard rotation,
and ``QUARL_COMPILE`` not ``0``. CUDA tensors use it only with ``QUARL_COMPILE=1``: Inductor emits Triton there, whose
fp32 division may be approximate; ``tests/formats/test_fast.py::test_cuda_matches_cpu`` (``gpu``) checks it and has
not run yet (no GPU was available when this was written). Anything else -- or any exception while compiling or
running (no compiler, unsupported device) -- falls back to eager; a failure is logged once and that format's compiled
path stays off (for as long as it is in the memo below).

Compile cost: the first call for a format in a process compiles it. Measured on a busy 2-core CPU (torch 2.13):
cold cache ~10-15 s per format, ~33 s for the first one in a process (it also pays Dynamo/Inductor start-up); the
FX-graph and kernel caches then persist on disk, so a later process needs ~3 s per format (~11 s for its first). The
caches live under ``$QUARL_CACHE_DIR/inductor`` (default ``~/.cache/quarl/inductor``) unless
``TORCHINDUCTOR_CACHE_DIR`` is already set (see :func:`_default_inductor_cache_dir` for why that is an environment
variable). ``QUARL_COMPILE=1`` forces the fast path for every size (used by the tests), ``0`` disables it.

State: the compiled functions are memoized by :func:`compiled_for`, an explicit ``functools.lru_cache`` bounded at
:data:`MAX_FORMATS` formats (``compiled_for.cache_clear()`` resets it); there are no other module globals.
"""

from __future__ import annotations

import functools
import logging
import os
import zlib
from pathlib import Path
from typing import Callable

import torch

from .quantize import fake_quantize_eager
from .registry import Family, NonFinite, Profile, QFormat, RoundingMode, TensorScale

logger = logging.getLogger(__name__)

MIN_NUMEL = 1 << 18
MAX_FORMATS = 64  # compiled formats kept per process (a run uses a handful; a rebuilt one reloads from disk)
ENV_SWITCH = "QUARL_COMPILE"
ENV_CACHE = "QUARL_CACHE_DIR"


def cache_dir() -> Path:
    """Directory for Inductor's caches (``$QUARL_CACHE_DIR/inductor``, default ``~/.cache/quarl/inductor``)."""
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "quarl")
    return Path(root) / "inductor"


def _default_inductor_cache_dir() -> None:
    """Point Inductor's on-disk caches at :func:`cache_dir` unless the user chose a location.

    Why an environment variable: torch 2.13 has no config knob for the local cache location -- every reader goes
    through ``torch._inductor.runtime.cache_dir_utils.cache_dir()``, which reads ``TORCHINDUCTOR_CACHE_DIR`` (and
    itself writes the variable back on first use), and compile worker subprocesses receive it through their
    environment; ``torch._inductor.config.global_cache_dir`` is fbcode-only. ``setdefault`` never overrides a value
    the user (or torch, once it has compiled anything) already set; torch creates the directory itself.
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))


def enabled_for(x: torch.Tensor, fmt: QFormat) -> bool:
    """Whether ``fake_quantize`` would take the compiled path for ``x`` (before any compile failure)."""
    switch = os.environ.get(ENV_SWITCH, "auto")
    if switch == "0":
        return False
    if fmt.rounding is RoundingMode.STOCHASTIC or fmt.hadamard:
        return False
    if fmt.profile is Profile.VLLM or fmt.tensor_scale is TensorScale.PER_TOKEN:
        return False  # eager only: vLLM's reciprocal chain must not be re-associated; T per row is not T per tensor
    if x.device.type == "cuda":
        return switch == "1"  # opt-in: Triton's fp32 division is not verified bit-exact here (no GPU was available)
    if x.device.type != "cpu":
        return False
    return switch == "1" or x.numel() >= MIN_NUMEL


class CompiledFakeQuant:
    """One format's compiled ``fake_quantize_eager``; after its first failure it stays off (``failed``)."""

    def __init__(self, fmt: QFormat) -> None:
        self.fmt = fmt
        # deterministic (a digest of the format's repr), not a build counter that depends on call order
        self.name = f"quarl_fake_quantize_{fmt.name}_{zlib.crc32(repr(fmt).encode()):08x}"
        self.fn: Callable | None = None  # built on the first call, inside the failure guard
        self.failed = False

    def _build(self) -> Callable:
        _default_inductor_cache_dir()
        fmt = self.fmt

        def run(x: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor:
            return fake_quantize_eager(x, fmt, None, global_amax)

        # Dynamo caches compiled graphs per *code object*; closures share one, and its guards do not tell two formats
        # apart (a torchao-profile call silently reused the compressed-tensors graph). A fresh code object per format
        # gives every format its own cache.
        code = run.__code__.replace(co_name=self.name)
        fresh = type(run)(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
        return torch.compile(fresh, dynamic=True, fullgraph=True)  # compiles lazily, on its first call

    def __call__(self, x: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor | None:
        """fp32 fake-quantized ``x``, or None after a compile/runtime failure (logged once; eager takes over)."""
        if self.failed:
            return None
        try:
            self.fn = self.fn or self._build()
            return self.fn(x, global_amax)
        except Exception as err:  # noqa: BLE001 -- any compiler/runtime failure means: use eager
            logger.warning("quarl.formats: compiled fake_quantize failed for %s (%s); using eager", self.fmt.name, err)
            self.failed, self.fn = True, None
            return None


@functools.lru_cache(maxsize=MAX_FORMATS)
def compiled_for(fmt: QFormat) -> CompiledFakeQuant:
    """The memoized compiled fake-quantizer of ``fmt`` (cheap: nothing is compiled before its first call)."""
    return CompiledFakeQuant(fmt)


def try_fake_quantize(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None, global_amax: torch.Tensor | None
) -> torch.Tensor | None:
    """fp32 fake-quantized ``x`` from the compiled path, or None when not eligible / on failure.

    The first call per format and process compiles (seconds, see the module docstring); later ones reuse it.
    """
    if not enabled_for(x, fmt) or x.numel() == 0:
        return None
    if fmt.family is Family.NVFP4 and global_amax is None:
        from .nvfp4 import tensor_amax  # the data-dependent finite check stays eager (cheap, one pass)

        global_amax = tensor_amax(x, fmt.nonfinite is NonFinite.BLOCK)
    return compiled_for(fmt)(x, global_amax)
