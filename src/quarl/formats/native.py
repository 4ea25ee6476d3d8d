"""Native CPU fast path for MX and NVFP4 ``fake_quantize``: one fused C pass per block, called through ctypes.

Why: eager fake quantization is ~25 torch ops (~150-300 us per call at decode shapes on a 2-core CPU, while the matmul
it feeds takes 15 us); ``torch.compile`` fuses them but pays Dynamo guards and a 10-35 s compile per format. The C
kernel in ``native_source.py`` does the whole block -- amax, scale, rounding, dequantization -- in 8-lane vector
registers: a few us per decode-shape call; per element on one core of the 2-core dev machine about 0.2-0.3 ns
(MXFP4) and 0.33-0.45 ns (NVFP4: a tensor-amax pass first), per call 1.2-2.3x (MXFP4) and 1.7-3.1x (NVFP4) a clone
of the same tensor at 256K elements, less from there up (``benchmarks/formats.py --percall``). OpenMP across chunks
of blocks with ``torch.get_num_threads()`` threads from ``PARALLEL_MIN`` elements (torch's own OpenMP runtime, so
one thread pool); one thread calls no OpenMP at all.

Contract: bit-identical to ``fake_quantize_eager`` (values, signs of zero, NaN positions), for every input it
accepts; tests/formats/test_native.py checks it on the adversarial sets. Anything it does not serve returns None and
the caller goes on to the compiled or eager path:

* formats: MX (every element grid, scale mode, ``rne`` / ``half_away``) and NVFP4 (all four profiles, both
  non-finite policies, 1-D blocks; ``tensor_scale`` dynamic, static through ``fake_quantize(..., global_amax)``, and
  per_token as one static-amax call per row), blocks along the last dim, no Hadamard rotation, deterministic rounding;
* tensors: CPU, fp32 (other float dtypes are converted to fp32 and back, as eager does), non-empty;
* inputs whose eager result hinges on NaN propagation through tensor-level constants (a non-finite tensor under
  ``nonfinite="reference"``, torchao's all-zero 0/0): the kernel says so and eager computes them.

Build: the first use on a machine compiles the C with the system compiler (``$CC``, else ``cc`` / ``gcc``; ~1 s)
into ``$QUARL_CACHE_DIR/native/`` (default ``~/.cache/quarl/native``), keyed by a hash of the source, the flags,
the compiler and the CPU, then loads it with ctypes; later processes just load it. Flags: ``-O3 -march=native``
(retried without ``-march=native``, then without OpenMP) and always ``-ffp-contract=off`` (no FMA contraction) and
no ``-ffast-math``. No compiler, a failed build or a failed load: logged once, and every call falls back to eager.
``QUARL_NATIVE=0`` turns the path off. Calls go through ``quarl_mx_fq`` / ``quarl_nvfp4_fq`` with the per-format
constants in one ctypes struct built once per format (7 arguments to convert per call instead of 19). From ``NT_MIN``
elements the output is written with streaming stores (a flat run of blocks into a 32-byte-aligned output, which
torch's 64-byte-aligned CPU allocations always are; plain stores otherwise).

State: the loaded library is memoized by :func:`library` (``functools.lru_cache``, ``library.cache_clear()`` resets
it); there are no other module globals.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .mx import _even_mbits, _target_pow2
from .registry import Family, NonFinite, Profile, QFormat, RoundingMode, ScaleMode, TensorScale
from .spec import FloatSpec

logger = logging.getLogger(__name__)

ENV_SWITCH = "QUARL_NATIVE"
PARALLEL_MIN = 1 << 16  # elements from which the kernel uses torch's intra-op thread count (below: 1 thread)
# elements from which the output is written with streaming (non-temporal) stores: 16 MiB of fp32, half the dev
# machine's L3, where a plain store's read-for-ownership costs more than the cache it would keep warm (kernel alone,
# one thread, vs copy_: 4096^2 MXFP4 1.06-1.08x -> 0.90-0.94x, NVFP4 1.34-1.50x -> 0.77-1.39x; per call vs a clone,
# nearly idle: 1.22x -> ~0.97x and 1.63x -> ~1.5x; benchmarks/formats.py --stores, results/formats_percall.txt)
NT_MIN = 1 << 22
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")
_MODE = {ScaleMode.FLOOR: 0, ScaleMode.CEIL: 1, ScaleMode.EVEN: 2, ScaleMode.RCEIL: 3}
_PROFILE = {Profile.COMPRESSED_TENSORS: 0, Profile.TORCHAO: 1, Profile.TRANSFORMER_ENGINE: 2, Profile.VLLM: 3}
_I64, _I32, _F32, _PTR = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p
_CALL_ARGS = [_PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int, ctypes.c_int]  # x, y, rows, len, &params, threads, nt


class _MXParams(ctypes.Structure):
    """``mx_params`` of the C source: :func:`_mx_args` in one struct, built once per format."""

    _fields_ = [("block", _I64), ("mode", _I32), ("even_mbits", _I32), ("p", _I32), ("rcp_max", _F32),
                ("is_int", _I32), ("mbits", _I32), ("emin", _I32), ("maxn", _F32), ("step", _F32), ("lo", _F32),
                ("hi", _F32), ("half_away", _I32)]


class _NVParams(ctypes.Structure):
    """``nv_params`` of the C source: block, profile, block-local policy, static amax (has_t, t), half-away."""

    _fields_ = [("block", _I64), ("profile", _I32), ("policy_block", _I32), ("has_t", _I32), ("t", _F32),
                ("half_away", _I32)]


def cache_dir() -> Path:
    """Where built kernels live: ``$QUARL_CACHE_DIR/native`` (default ``~/.cache/quarl/native``)."""
    root = os.environ.get("QUARL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "quarl")
    return Path(root) / "native"


def compiler() -> str | None:
    """The C compiler to build with (``$CC``, else ``cc``, else ``gcc``), or None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_id() -> str:
    """Machine identity for the cache key (``-march=native`` code must not load on another CPU)."""
    ident = os.uname().machine
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features", "CPU part")):
                    ident += line
                if line.strip() == "":
                    break  # the first processor's block is enough
    except OSError:
        pass
    return ident


def _attempts() -> list[tuple[str, ...]]:
    return [("-march=native", "-fopenmp"), ("-fopenmp",), ()]


def _build(cc: str, src: str, out: Path, attempts: list[tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """Compile ``src`` into ``out`` with the first flag set that works (default :func:`_attempts`); returns it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        c_file = Path(tmp) / "quarl_fq.c"
        c_file.write_text(src, encoding="utf-8")
        errors = []
        for extra in _attempts() if attempts is None else attempts:
            so = Path(tmp) / "quarl_fq.so"
            cmd = [cc, *BASE_FLAGS, *extra, str(c_file), "-o", str(so)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(so, out)  # atomic: concurrent builders race harmlessly
                return extra
            errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("; ".join(errors))


def _key(cc: str, src: str) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    blob = "\0".join([src, " ".join(BASE_FLAGS), repr(_attempts()), version, _cpu_id()])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use per machine), or None when it cannot be had (logged once)."""
    from .native_source import SOURCE

    try:
        cc = compiler()
        if cc is None:
            logger.info("quarl.formats: no C compiler found; fake_quantize uses the eager/compiled paths")
            return None
        path = cache_dir() / f"quarl_fq_{_key(cc, SOURCE)}.so"
        if not path.exists():
            t0 = time.perf_counter()
            extra = _build(cc, SOURCE, path)
            logger.info("quarl.formats: built the native kernel in %.1f s (%s %s) -> %s",
                        time.perf_counter() - t0, os.path.basename(cc), " ".join(extra) or "(portable)", path)
        return load(path)
    except Exception as err:  # noqa: BLE001 -- any build/load failure means: use the other paths
        logger.warning("quarl.formats: native kernel unavailable (%s); using the eager/compiled paths", err)
        return None


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library with its entry points typed (``quarl_mx_fq``, ``quarl_nvfp4_fq``)."""
    lib = ctypes.CDLL(str(path))
    for fn in (lib.quarl_mx_fq, lib.quarl_nvfp4_fq):
        fn.argtypes, fn.restype = _CALL_ARGS, ctypes.c_int
    return lib


def serves(fmt: QFormat) -> bool:
    """Whether the kernel implements ``fmt`` (format features only; tensors are checked per call)."""
    if fmt.family not in (Family.MX, Family.NVFP4) or fmt.hadamard or fmt.block_2d:
        return False
    return fmt.rounding is not RoundingMode.STOCHASTIC


def enabled() -> bool:
    """False when ``QUARL_NATIVE=0``."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def _threads(numel: int) -> int:
    return torch.get_num_threads() if numel >= PARALLEL_MIN else 1


@functools.lru_cache(maxsize=256)
def _mx_args(fmt: QFormat) -> tuple:
    """The kernel's per-format arguments (computed once: ``FloatSpec.emax`` alone costs a few us)."""
    elem = fmt.elem
    is_float = isinstance(elem, FloatSpec)
    mbits, emin = (elem.mbits, elem.emin) if is_float else (0, 0)
    step, lo, hi = (1.0, 0.0, 0.0) if is_float else (elem.step, elem.qmin * elem.step, elem.qmax * elem.step)
    return (fmt.block_size, _MODE[fmt.scale_mode], _even_mbits(fmt), _target_pow2(elem), 1.0 / elem.max_normal,
            int(not is_float), mbits, emin, elem.max_normal, step, lo, hi, int(fmt.rounding is RoundingMode.HALF_AWAY))


@functools.lru_cache(maxsize=256)
def _nv_args(fmt: QFormat) -> tuple:
    return (fmt.block_size, _PROFILE[fmt.profile], int(fmt.nonfinite is NonFinite.BLOCK))


def _static_amax(global_amax: torch.Tensor | None) -> tuple[int, float] | None:
    """(has_t, t) for the kernel, or None when a static amax is not a single finite value (eager decides)."""
    if global_amax is None:
        return 0, 0.0
    if global_amax.numel() != 1:
        return None
    t = float(global_amax.to(torch.float32).reshape(()))  # a Python float holds any fp32 exactly
    return None if t != t or abs(t) == float("inf") else (1, t)


def _params(fmt: QFormat, static: tuple[int, float] = (0, 0.0)) -> ctypes.Structure:
    """The C kernel's parameter struct for ``fmt`` (NVFP4: with the static amax ``(has_t, t)``)."""
    if fmt.family is Family.MX:
        return _MXParams(*_mx_args(fmt))
    return _NVParams(*_nv_args(fmt), *static, int(fmt.rounding is RoundingMode.HALF_AWAY))


def _kernel(lib: ctypes.CDLL, fmt: QFormat) -> Callable:
    return lib.quarl_mx_fq if fmt.family is Family.MX else lib.quarl_nvfp4_fq


def bind(fmt: QFormat) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """The kernel for one format with its arguments resolved once (the hot-loop form of :func:`fake_quantize`).

    Returns:
        ``run(x)`` -> fp32 fake-quantized ``x`` or None (not served: the caller falls back), or None when the kernel
        does not serve ``fmt`` at all or cannot be built. ``run`` takes no static ``global_amax``.
    """
    if not enabled() or not serves(fmt) or fmt.tensor_scale is TensorScale.STATIC:
        return None  # (static: ``run`` has no amax; the caller passes it to :func:`fake_quantize`)
    lib = library()
    if lib is None:
        return None
    if fmt.tensor_scale is TensorScale.PER_TOKEN:
        return _per_row(fmt, lib)
    kernel, params = _kernel(lib, fmt), _params(fmt)
    ref = ctypes.byref(params)  # (the closure keeps params alive)
    block, axis, f32 = fmt.block_size, fmt.axis, torch.float32
    threads_of = torch.get_num_threads

    def run(x: torch.Tensor) -> torch.Tensor | None:
        ndim = x.dim()
        if not x.is_cpu or ndim == 0 or not x.is_floating_point() or axis not in (-1, ndim - 1):
            return None
        x32 = x if x.dtype is f32 and x.is_contiguous() else x.to(f32).contiguous()
        numel, length = x32.numel(), x32.shape[-1]
        if numel == 0:
            return None
        y = torch.empty_like(x32)
        rows, length = (1, numel) if length % block == 0 else (numel // length, length)
        threads = threads_of() if numel >= PARALLEL_MIN else 1
        status = kernel(x32.data_ptr(), y.data_ptr(), rows, length, ref, threads, int(numel >= NT_MIN))
        return y if status == 0 else None

    return run


def _per_row(fmt: QFormat, lib: ctypes.CDLL) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """NVFP4 ``tensor_scale="per_token"``: the static-amax kernel once per row, with that row's amax as ``T``.

    Eager's per-row amax is the same max (``nvfp4.row_amax``), so each row is exactly eager's; a non-finite row amax
    under the reference policy (or any row the kernel declines) leaves the whole call to eager.
    """
    kernel, params = _kernel(lib, fmt), _params(fmt, (1, 0.0))
    ref = ctypes.byref(params)
    block_local, axis, f32 = fmt.nonfinite is NonFinite.BLOCK, fmt.axis, torch.float32

    def run(x: torch.Tensor) -> torch.Tensor | None:
        ndim = x.dim()
        if not x.is_cpu or ndim == 0 or not x.is_floating_point() or axis not in (-1, ndim - 1) or x.numel() == 0:
            return None
        x32 = x if x.dtype is f32 and x.is_contiguous() else x.to(f32).contiguous()
        length = x32.shape[-1]
        a = x32.reshape(-1, length).abs()
        if block_local:
            a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
        amax = a.amax(dim=1)
        if not block_local and not bool(torch.isfinite(amax).all()):
            return None
        y = torch.empty_like(x32)
        xp, yp, step = x32.data_ptr(), y.data_ptr(), length * x32.element_size()
        for r, t in enumerate(amax.tolist()):  # a Python float holds each fp32 amax exactly
            params.t = t
            if kernel(xp + r * step, yp + r * step, 1, length, ref, 1, 0) != 0:
                return None
        return y

    return run


def fake_quantize(x: torch.Tensor, fmt: QFormat, global_amax: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 fake-quantized ``x`` from the native kernel, or None when it does not serve this call.

    Args:
        x: float tensor (CPU; any float dtype, computed in fp32).
        fmt: the format (see :func:`serves`).
        global_amax: NVFP4 static per-tensor amax, shape ``(1,)``.

    Returns:
        fp32 tensor shaped like ``x``, bit-identical to ``fake_quantize_eager(x, fmt, None, global_amax)``; None
        when the format, tensor or input values are not served (the caller falls back).
    """
    if not enabled():
        return None
    lib = library()
    if lib is None:
        return None
    if global_amax is None:
        run = _bound(fmt, lib)
        return None if run is None else run(x)
    if fmt.family is not Family.NVFP4 or not serves(fmt) or x.device.type != "cpu" or x.numel() == 0:
        return None  # (MX with a global_amax: eager raises the ValueError)
    if x.dim() == 0 or fmt.axis not in (-1, x.dim() - 1):
        return None
    static = _static_amax(global_amax)
    if static is None:
        return None
    x32 = x.to(torch.float32).contiguous()
    y = torch.empty_like(x32)
    length = x32.shape[-1]
    rows = x32.numel() // length
    if length % fmt.block_size == 0:  # no partial blocks: one flat run of blocks (scale passes span rows)
        rows, length = 1, x32.numel()
    status = _kernel(lib, fmt)(x32.data_ptr(), y.data_ptr(), rows, length, ctypes.byref(_params(fmt, static)),
                               _threads(x32.numel()), int(x32.numel() >= NT_MIN))
    return y if status == 0 else None


@functools.lru_cache(maxsize=256)
def _bound(fmt: QFormat, lib: ctypes.CDLL) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """:func:`bind` memoized per (format, loaded library)."""
    return bind(fmt)
