"""Forward-time overhead of quarl.inject on a small HF Llama: unquantized vs W4A16 vs W4A4, as ratios in one run.

    python benchmarks/inject.py [--layers 8] [--hidden 512] [--batch 4] [--seq 128] [--reps 10] [--stats-every 1]

Target (issue 3): W4A4 <= 1.3x the unquantized forward. Weights are fake-quantized once per weight version (cached),
so W4A16 should cost ~1.0x after the first call; W4A4 adds one activation fake-quant per linear input per forward,
plus the telemetry reductions (``--stats-every N`` measures every N-th call). Timings are medians over ``--reps``
forwards after warm-up (the first call pays the weight quantization and any compile), under ``torch.no_grad``, fp32,
on whatever CPU/GPU this runs on; the machine used for the numbers in the report is stated there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quarl.inject import InjectionSpec, attach


def _model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    return LlamaForCausalLM(cfg).eval().to(args.device)


def _time(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        for _ in range(2):  # warm-up: weight cache fill, allocator, compile
            model(ids)
        times = []
        for _ in range(reps):
            if ids.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            if ids.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--stats-every", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = _model(args)
    ids = torch.randint(0, 8192, (args.batch, args.seq), device=args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Llama {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, stats_every={args.stats_every}")
    base = _time(model, ids, args.reps)
    print(f"{'unquantized':22s} {base * 1e3:8.1f} ms   1.00x")
    for label, spec in [("W4A16 (mxfp4)", InjectionSpec(scheme="W4A16")),
                        ("W4A4  (mxfp4)", InjectionSpec(scheme="W4A4")),
                        ("NVFP4A16", InjectionSpec(scheme="NVFP4A16")),
                        ("NVFP4 (W4A4)", InjectionSpec(scheme="NVFP4"))]:
        with attach(model, spec, stats_every=args.stats_every):
            t = _time(model, ids, args.reps)
        print(f"{label:22s} {t * 1e3:8.1f} ms   {t / base:.2f}x")
    again = _time(model, ids, args.reps)  # drift check: the machine is shared
    print(f"{'unquantized (again)':22s} {again * 1e3:8.1f} ms   {again / base:.2f}x")


if __name__ == "__main__":
    main()
