"""Compiled fast path for ``fake_quantize``: the eager numerics, fused by ``torch.compile`` (Inductor).

Why: eager fake quantization makes ~20 passes over memory; on a 4096x4096 fp32 CPU tensor the references take 15-19x
a ``clone()``. Compiling the very same eager function fuses it into a few loops (issue 2 part D: target <= 3x a clone).

Contract: bit-identical to ``fake_quantize_eager`` (tests/formats/test_fast.py compares with ``torch.equal`` and
NaN positions, including ties, zeros, saturation and non-finite blocks). Inductor does not reassociate or contract
fp32 arithmetic by default, and every operation here is exact or a single correctly rounded IEEE op.

When it is used: CPU tensors with at least :data:`MIN_NUMEL` elements, deterministic rounding, no Hadamard rotation,
and ``QUARL_COMPILE`` not ``0``. CUDA tensors use it only with ``QUARL_COMPILE=1``: Inductor emits Triton there, whose
fp32 division may be approximate; ``tests/formats/test_fast.py::test_cuda_matches_cpu`` (``gpu``) checks it and has
not run yet (no GPU was available when this was written). Anything else -- or any exception while compiling or running (no compiler, unsupported
device) -- falls back to eager; a failure is logged once and that format is not tried again in this process.

Compile cost: paid once per format and process; Inductor's FX-graph and kernel caches persist across processes under
``$QUARL_CACHE_DIR/inductor`` (default ``~/.cache/quarl/inductor``) unless ``TORCHINDUCTOR_CACHE_DIR`` is already set.
``QUARL_COMPILE=1`` forces the fast path for every size (used by the tests), ``0`` disables it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from .quantize import fake_quantize_eager
from .registry import Family, QFormat, RoundingMode

logger = logging.getLogger(__name__)

MIN_NUMEL = 1 << 18
ENV_SWITCH = "QUARL_COMPILE"
ENV_CACHE = "QUARL_CACHE_DIR"

_compiled: dict[QFormat, Callable] = {}
_failed: set[QFormat] = set()


def cache_dir() -> Path:
    """Directory for Inductor's caches (``$QUARL_CACHE_DIR/inductor``, default ``~/.cache/quarl/inductor``)."""
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "quarl")
    return Path(root) / "inductor"


def enabled_for(x: torch.Tensor, fmt: QFormat) -> bool:
    """Whether ``fake_quantize`` would take the compiled path for ``x``."""
    switch = os.environ.get(ENV_SWITCH, "auto")
    if switch == "0" or fmt in _failed:
        return False
    if fmt.rounding is RoundingMode.STOCHASTIC or fmt.hadamard:
        return False
    if x.device.type == "cuda":
        return switch == "1"  # opt-in: Triton's fp32 division is not verified bit-exact here (no GPU was available)
    if x.device.type != "cpu":
        return False
    return switch == "1" or x.numel() >= MIN_NUMEL


def _build(fmt: QFormat) -> Callable:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = cache_dir()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)

    def run(x: torch.Tensor, global_amax: torch.Tensor | None) -> torch.Tensor:
        return fake_quantize_eager(x, fmt, None, global_amax)

    # Dynamo caches compiled graphs per *code object*; closures share one, and its guards do not tell two formats
    # apart (a torchao-profile call silently reused the compressed-tensors graph). A fresh code object per format
    # gives every format its own cache.
    code = run.__code__.replace(co_name=f"quarl_fake_quantize_{len(_compiled)}")
    fresh = type(run)(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
    return torch.compile(fresh, dynamic=True, fullgraph=True)


def try_fake_quantize(
    x: torch.Tensor, fmt: QFormat, generator: torch.Generator | None, global_amax: torch.Tensor | None
) -> torch.Tensor | None:
    """fp32 fake-quantized ``x`` from the compiled path, or None when not eligible / on failure."""
    if not enabled_for(x, fmt) or x.numel() == 0:
        return None
    if fmt.family is Family.NVFP4 and global_amax is None:
        from .nvfp4 import tensor_amax  # the data-dependent finite check stays eager (cheap, one pass)

        global_amax = tensor_amax(x)
    try:
        fn = _compiled.get(fmt) or _compiled.setdefault(fmt, _build(fmt))
        return fn(x, global_amax)
    except Exception as err:  # noqa: BLE001 -- any compiler/runtime failure means: use eager
        logger.warning("quarl.formats: compiled fake_quantize failed for %s (%s); using eager", fmt.name, err)
        _failed.add(fmt)
        _compiled.pop(fmt, None)
        return None
