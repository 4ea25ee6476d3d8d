"""Forward-time overhead of quarl.inject on a small HF Llama: unquantized vs W4A16 vs W4A4, as ratios in one run.

    python benchmarks/inject.py [--layers 8] [--hidden 512] [--batch 4] [--seq 128] [--reps 10] [--stats-every 1]

Targets: W4A16 <= 1.1x and W4A4 <= 1.3x the unquantized forward. Weights are fake-quantized once per weight version (cached),
so W4A16 should cost ~1.0x after the first call; W4A4 adds one activation fake-quant per linear input per forward
(a rotation adds two products per input: K x b for ``block``, K x K for ``full``; the weight's is cached), plus the
telemetry reductions (``--stats-every N`` measures every N-th call). Timings are medians over ``--reps``
forwards after warm-up (the first call pays the weight quantization and any compile), under ``torch.no_grad``, fp32,
on whatever CPU/GPU this runs on; the machine used for the numbers in the report is stated there.
"""

from __future__ import annotations

import argparse
import copy
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


def _once(model: torch.nn.Module, ids: torch.Tensor) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(ids)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


VARIANTS = {
    "W4A16 (mxfp4)": InjectionSpec(scheme="W4A16"),
    "W4A4  (mxfp4)": InjectionSpec(scheme="W4A4"),
    "NVFP4A16": InjectionSpec(scheme="NVFP4A16"),
    "NVFP4 (W4A4)": InjectionSpec(scheme="NVFP4"),
    # rotations: e(xR)R^T on every linear input per forward; the weight's rotation is cached with e(W)
    "W4A4 + block rot": InjectionSpec(scheme="W4A4", rotation="block"),
    "W4A4 + full rot": InjectionSpec(scheme="W4A4", rotation="full"),
    "NVFP4 + block rot": InjectionSpec(scheme="NVFP4", rotation="block"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--stats-every", type=int, default=16)  # attach() default
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    base = _model(args)
    ids = torch.randint(0, 8192, (args.batch, args.seq), device=args.device)
    print(f"Llama {sum(q.numel() for q in base.parameters()) / 1e6:.1f}M params, batch {args.batch} x {args.seq} "
          f"tokens, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"stats_every={args.stats_every}")
    # One model copy per variant, injected once; the variants are timed round-robin so that load drift on a
    # shared machine hits all of them alike, and each ratio is the median of per-round ratios.
    models = {"unquantized": base}
    injectors = []
    for label, spec in VARIANTS.items():
        models[label] = copy.deepcopy(base)
        injectors.append(attach(models[label], spec, stats_every=args.stats_every))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up: weight cache fill, allocator, compile
            m(ids)
            m(ids)
        for _ in range(args.reps):
            for label, m in models.items():
                times[label].append(_once(m, ids))
    # min over reps approximates the uncontended time; the median per-round ratio shows the typical overhead
    base_min = min(times["unquantized"])
    for label, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times["unquantized"]))
        print(f"{label:16s} min {min(ts) * 1e3:8.1f} ms  ratio(min) {min(ts) / base_min:.2f}x   "
              f"median {statistics.median(ts) * 1e3:8.1f} ms  ratio(median per round) {ratio:.2f}x")
    _recheck_costs(models["W4A16 (mxfp4)"], injectors[0], models["unquantized"], ids, args.reps)
    for inj in injectors:
        inj.detach()


def _recheck_costs(model: torch.nn.Module, inj, base: torch.nn.Module, ids: torch.Tensor, reps: int) -> None:
    """The weight cache's freshness checks, as ratios to the unquantized forward in the same rounds: a forward right
    after a phase change (every cached weight re-checked by its checksum, once per phase) and right after
    ``invalidate_weights()`` (every weight re-quantized, as after a weight sync)."""
    times: dict[str, list[float]] = {"unquantized": [], "after phase change": [], "after invalidate_weights": []}
    phases = ("rollout", "training")
    with torch.no_grad():
        for r in range(reps):
            times["unquantized"].append(_once(base, ids))
            inj.set_phase(phases[r % 2])
            times["after phase change"].append(_once(model, ids))
            inj.invalidate_weights()
            times["after invalidate_weights"].append(_once(model, ids))
    inj.set_phase(None)
    for label, ts in list(times.items())[1:]:
        ratio = statistics.median(t / b for t, b in zip(ts, times["unquantized"]))
        print(f"W4A16 {label:26s} median {statistics.median(ts) * 1e3:8.1f} ms  ratio(median per round) {ratio:.2f}x")


if __name__ == "__main__":
    main()
