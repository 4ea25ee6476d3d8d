"""Benchmark: quarl ``fake_quantize`` (nvfp4, mxfp4) vs ``x.clone()`` and the reference libraries' fake-quant.

Run: python benchmarks/formats.py [--size 4096] [--repeats 5]

Prints, for a (size x size) fp32 CPU tensor, the median time of each path and its ratio to ``x.clone()``, plus
whether quarl's compiled and eager results are bit-identical to each other and to the reference (issue 2 part D:
target <= 3x a clone). The first compiled call (compile or cache load) is timed separately. No asserts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quarl.formats import fake_quantize, get_format
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
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
