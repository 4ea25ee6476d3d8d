"""Benchmark: quarl ``fake_quantize`` (nvfp4, mxfp4) vs ``x.clone()`` and the reference libraries' fake-quant.

Run: python benchmarks/formats.py [--size 4096] [--repeats 5]
     python benchmarks/formats.py --percall [--threads 1,2] [--rounds 41]
     python benchmarks/formats.py --stores [--threads 1,2] [--rounds 41]

Default: for a (size x size) fp32 CPU tensor, the median time of each path and its ratio to ``x.clone()``, plus
whether quarl's compiled and eager results are bit-identical to each other and to the reference (target:
<= 3x a clone). The first compiled call (compile or cache load) is timed separately.

``--percall``: activation fake-quant per call (no_grad, fp32) from 64K to 16M elements against a clone of the same
tensor, for each thread count (targets: <= 3x a clone from 256K elements, 4096^2 <= 1.5x). Each round times a
~0.5 ms batch of every path back to back (clone, then ``fake_quantize`` and the bound ``fake_quantizer`` of the
activation hooks, for MXFP4 and NVFP4), in a rotating order; the table gives each path's median per-call time over
the rounds and its ratio to the clone's median. Short batches keep a shared, loaded machine from charging its
preemptions to the longer path; the load average is printed with the table. No asserts.

``--stores``: the native kernel alone (one ctypes call into a preallocated output, so no allocator page faults) with
plain stores vs streaming (non-temporal) stores, against ``copy_`` into the same output, at 4M and 16M elements:
the measurement behind ``quarl.formats.native.NT_MIN``. Same binary, same process, interleaved rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

import torch

from quarl.formats import fake_quantize, fake_quantizer, get_format, native
from quarl.formats.quantize import fake_quantize_eager


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ct_nvfp4(x: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            scale_dtype=torch.float8_e4m3fn)
    amax = x.abs().amax().reshape(1)
    gs = generate_gparam(-amax, amax)
    g = x.reshape(x.shape[0], -1, 16).abs().amax(-1)
    scale, zp = calculate_qparams(-g, g, args, global_scale=gs)
    return ct_fq(x, scale, zp, args, global_scale=gs)


def _ct_mxfp4(x: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fq
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True,
                            scale_dtype=torch.uint8)
    g = x.reshape(x.shape[0], -1, 32).abs().amax(-1)
    scale, zp = calculate_qparams(-g, g, args)
    return ct_fq(x, scale, zp, args)


def _ao_nvfp4(x: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    pts = per_tensor_amax_to_scale(x.abs().amax())
    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts).dequantize(torch.float32)


def _ao_mxfp4(x: torch.Tensor) -> torch.Tensor:
    from torchao.prototype.mx_formats.mx_tensor import MXTensor

    return MXTensor.to_mx(x, torch.float4_e2m1fn_x2, 32).dequantize(torch.float32)


# the quarl profile that reproduces each reference (mxfp4's default is OCP FLOOR; compressed-tensors rounds EVEN)
PROFILES = {("compressed-tensors", "nvfp4"): "compressed_tensors", ("torchao", "nvfp4"): "torchao",
            ("compressed-tensors", "mxfp4"): "compressed_tensors", ("torchao", "mxfp4"): "ocp"}


PERCALL_SHAPES = [(64, 1024), (64, 4096), (256, 4096), (1024, 4096), (4096, 4096)]


def _batch_us(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def _percall_row(x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """{path: (median us per call, its ratio to the clone's median)} for one tensor."""
    fmts = {"mx": get_format("mxfp4"), "nv": get_format("nvfp4")}
    paths = {"clone": x.clone}
    for n, f in fmts.items():
        paths[n] = lambda f=f: fake_quantize(x, f)
        paths[n + " bound"] = lambda q=fake_quantizer(f): q(x)
    # batches of ~0.5 ms per path: well under a scheduler time slice, so that most batches of every path run
    # uncontended and the medians compare like with like on a loaded machine
    reps = {k: max(1, round(500 / max(1.0, min(_batch_us(fn, 1) for _ in range(3))))) for k, fn in paths.items()}
    times = {k: [] for k in paths}
    names = list(paths)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            times[k].append(_batch_us(paths[k], reps[k]))
    clone = statistics.median(times["clone"])
    return {k: (statistics.median(v), statistics.median(v) / clone) for k, v in times.items()}


def percall(thread_counts: list[int], rounds: int) -> None:
    """Print the per-call table (see the module docstring)."""
    default = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(1 min), fp32, no_grad; median of {rounds} rounds")
    print(f"{'threads':>7s} {'shape':>12s} {'numel':>9s} | {'clone us':>9s} {'mx us':>9s} {'nv us':>9s} | "
          "mx/clone nv/clone | bound: mx/clone nv/clone | == eager")
    with torch.no_grad():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for shape in PERCALL_SHAPES:
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
                row = _percall_row(x, rounds)
                exact = all(torch.equal(fake_quantize(x, n), fake_quantize_eager(x, get_format(n)))
                            for n in ("mxfp4", "nvfp4"))
                print(f"{threads:7d} {str(shape):>12s} {x.numel():9d} | {row['clone'][0]:9.1f} "
                      f"{row['mx'][0]:9.1f} {row['nv'][0]:9.1f} | {row['mx'][1]:8.2f} {row['nv'][1]:8.2f} | "
                      f"{row['mx bound'][1]:14.2f} {row['nv bound'][1]:8.2f} | {exact}", flush=True)
    torch.set_num_threads(default)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def stores(thread_counts: list[int], rounds: int) -> None:
    """Print the kernel-alone plain vs streaming stores table (see the module docstring)."""
    lib = native.library()
    if lib is None:
        print("native kernel unavailable (no compiler?): nothing to measure")
        return
    default = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min); "
          f"median ms of {rounds} interleaved rounds, output preallocated")
    print(f"{'threads':>7s} {'shape':>12s} {'format':>6s} | {'plain':>7s} {'stream':>7s} {'copy_':>7s} | "
          "plain/copy stream/copy")
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for shape in PERCALL_SHAPES[-2:]:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            y, n = torch.empty_like(x), x.numel()
            for name in ("mxfp4", "nvfp4"):
                fmt = get_format(name)
                kernel, params = native._kernel(lib, fmt), native._params(fmt)
                ref = ctypes.byref(params)
                paths = {"plain": lambda: kernel(x.data_ptr(), y.data_ptr(), 1, n, ref, threads, 0),
                         "stream": lambda: kernel(x.data_ptr(), y.data_ptr(), 1, n, ref, threads, 1),
                         "copy_": lambda: y.copy_(x)}
                times = {k: [] for k in paths}
                for _ in range(rounds):
                    for k, fn in paths.items():
                        times[k].append(_batch_us(fn, 1) / 1e3)
                ms = {k: statistics.median(v) for k, v in times.items()}
                print(f"{threads:7d} {str(shape):>12s} {name:>6s} | {ms['plain']:7.2f} {ms['stream']:7.2f} "
                      f"{ms['copy_']:7.2f} | {ms['plain'] / ms['copy_']:10.2f} {ms['stream'] / ms['copy_']:11.2f}",
                      flush=True)
    torch.set_num_threads(default)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--percall", action="store_true", help="the per-call table from 64K to 16M elements instead")
    p.add_argument("--stores", action="store_true", help="the kernel alone: plain vs streaming stores vs copy_")
    p.add_argument("--threads", default=None, help="comma-separated thread counts for --percall / --stores "
                   "(default: 1,N)")
    p.add_argument("--rounds", type=int, default=41, help="rounds per row for --percall / --stores")
    args = p.parse_args()
    if args.percall or args.stores:
        n = torch.get_num_threads()
        counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, n})
        (percall if args.percall else stores)(counts, args.rounds)
        return
    x = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    t_clone = _time(lambda: x.clone(), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, x: {tuple(x.shape)} fp32 CPU")
    print(f"x.clone(): {t_clone * 1e3:.1f} ms")
    refs = {"nvfp4": {"compressed-tensors": _ct_nvfp4, "torchao": _ao_nvfp4},
            "mxfp4": {"compressed-tensors": _ct_mxfp4, "torchao": _ao_mxfp4}}
    for name, fmt in (("nvfp4", get_format("nvfp4")), ("mxfp4", get_format("mxfp4"))):
        t0 = time.perf_counter()
        y = fake_quantize(x, fmt)
        first = time.perf_counter() - t0
        t_fast = _time(lambda: fake_quantize(x, fmt), args.repeats)
        t_eager = _time(lambda: fake_quantize_eager(x, fmt), max(1, args.repeats // 2))
        same = torch.equal(y, fake_quantize_eager(x, fmt))
        print(f"\n{name}: quarl fake_quantize {t_fast * 1e3:.1f} ms = {t_fast / t_clone:.2f}x clone "
              f"(first call incl. compile/cache load {first:.1f} s; compiled == eager: {same})")
        print(f"  quarl eager path        {t_eager * 1e3:.1f} ms = {t_eager / t_clone:.2f}x clone")
        for lib, fn in refs[name].items():
            t_ref = _time(lambda: fn(x), max(1, args.repeats // 2))
            profile = PROFILES[(lib, name)]
            exact = torch.equal(fn(x), fake_quantize(x, name, profile=profile))
            print(f"  {lib:<18} {t_ref * 1e3:.1f} ms = {t_ref / t_clone:.2f}x clone; quarl is {t_ref / t_fast:.1f}x "
                  f"faster; bit-exact with quarl profile={profile!r}: {exact}")


if __name__ == "__main__":
    main()
