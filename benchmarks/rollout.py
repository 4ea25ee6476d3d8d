"""Greedy rollouts under emulated W4A4: unquantized vs MXFP4 / NVFP4 W4A4, same tokens generated, in one run.

    python benchmarks/rollout.py                                  # testbed, batch 64, 64 new tokens
    python benchmarks/rollout.py --model smollm2 --batch 16 --new-tokens 32
    python benchmarks/rollout.py --percall-only                   # fake_quantize per call vs the linear / a clone
    python benchmarks/rollout.py --kv-cache fp8_e4m3 --no-percall   # + each variant with an FP8 KV cache

Targets: W4A4 generation <= 1.5x the unquantized generation of the same model (goal 1.1x); activation
fake-quant <= 30 us per call up to 16K elements, <= 0.3x the linear it feeds from hidden 576 up, <= 3x a clone from
256K elements, 4096^2 fp32 <= 1.5x a clone.

What is timed: a KV-cache greedy decode of ``--new-tokens`` tokens after the prefill of ``--batch`` held-out prompts,
EOS ignored, so every variant runs exactly the same number of forwards of the same shapes (the tokens differ: the
quantized model picks its own). Variants run round-robin, ``--reps`` times; reported are the min over reps (the
uncontended time on a shared machine), tokens/s and the median per-round ratio to unquantized. The first rollout of
each variant is reported separately: it pays the weight quantization and, once per machine, the native kernel build
or ``torch.compile`` (cached on disk afterwards). With CUDA present the Triton kernel's achieved fraction of HBM
bandwidth is printed too. Ratios, never asserts: the machine is shared.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import time

import torch

from quarl.formats import fake_quantize, get_format
from quarl.inject import InjectionSpec, attach

SCHEMES = {"MXFP4 W4A4": "MXFP4", "NVFP4 W4A4": "NVFP4"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompts(model_name: str, tokenizer, n: int) -> list[str]:
    from quarl.eval.harness import build_prompt
    from quarl.models.testbed import DEFAULT_CONFIG, PROMPT_SUFFIX, held_out

    return [build_prompt(tokenizer, p.question, PROMPT_SUFFIX) for p in held_out(DEFAULT_CONFIG, n)]


def _encode(tokenizer, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)  # (B, T) left-padded
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)  # (B, T)
    return ids, mask


@torch.no_grad()
def rollout(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(seconds, generated tokens (B, new_tokens)) of a fixed-length greedy KV-cache decode."""
    _sync(ids.device)
    t0 = time.perf_counter()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    toks = []
    for _ in range(new_tokens):
        tok = out.logits[:, -1, :].argmax(dim=-1)  # (B,)
        toks.append(tok)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    logits_to_keep=1, **{cache_kw: out.past_key_values})
    _sync(ids.device)
    return time.perf_counter() - t0, torch.stack(toks, dim=1)


def _per_call_us(fn, reps: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best * 1e6


def percall(device: torch.device) -> None:
    """fake_quantize per call (no_grad, fp32) vs the linear it feeds ((rows, k) @ (k, k)) and vs a clone."""
    print("\nfake_quantize per call (no_grad, fp32; min of 3 runs):")
    print(f"{'shape':>14s} {'numel':>9s} | {'mxfp4 us':>9s} {'nvfp4 us':>9s} | {'linear us':>9s} {'clone us':>9s} | "
          "mx/lin  nv/lin  mx/clone nv/clone")
    shapes = [(1, 96), (64, 96), (64, 256), (64, 576), (16, 1536), (64, 1536), (64, 4096), (256, 1024),
              (512, 1024), (4096, 4096)]
    fmts = {"mx": get_format("mxfp4"), "nv": get_format("nvfp4")}
    with torch.no_grad():
        for rows, k in shapes:
            x = torch.randn(rows, k, device=device)
            reps = max(3, min(300, 2_000_000 // (rows * k)))
            t = {n: _per_call_us(lambda f=f: (fake_quantize(x, f), _sync(device)), reps) for n, f in fmts.items()}
            clone = _per_call_us(lambda: (x.clone(), _sync(device)), reps)
            if k <= 4096 and rows * k <= 1 << 20:
                w = torch.randn(k, min(k, 1536), device=device)
                lin = _per_call_us(lambda: (x @ w, _sync(device)), max(3, reps // 4))
            else:
                lin = float("nan")
            print(f"{str((rows, k)):>14s} {rows * k:9d} | {t['mx']:9.1f} {t['nv']:9.1f} | {lin:9.1f} {clone:9.1f} | "
                  f"{t['mx'] / lin:6.2f}  {t['nv'] / lin:6.2f}  {t['mx'] / clone:7.2f}  {t['nv'] / clone:7.2f}")


def hbm(device: torch.device) -> None:
    """Achieved fraction of peak memory bandwidth of the Triton kernel (CUDA only)."""
    from quarl.formats import gpu

    x = torch.randn(8192, 8192, device=device)
    peak = gpu.peak_bandwidth(device)
    for name in ("mxfp4", "nvfp4"):
        fmt = get_format(name)
        fn = lambda: (gpu.fake_quantize(x, fmt), torch.cuda.synchronize())  # noqa: E731
        s = _per_call_us(fn, 20) * 1e-6
        moved = 2 * x.numel() * 4  # one read, one write (NVFP4 reads twice: amax pass + quantize pass)
        moved += x.numel() * 4 if name == "nvfp4" else 0
        print(f"triton {name}: {s * 1e3:.3f} ms, {moved / s / 1e9:.0f} GB/s = {moved / s / peak:.0%} of peak "
              f"({peak / 1e9:.0f} GB/s)")


def native_first_use() -> None:
    """Print the native kernel's first-use cost: a build (once per machine, then cached on disk) or a load."""
    from quarl.formats import native

    cc = native.compiler()
    cached = cc is not None and any(native.cache_dir().glob(f"quarl_fq_{native._key(cc, _source())}.so"))
    t0 = time.perf_counter()
    lib = native.library()
    what = "unavailable (eager fallback)" if lib is None else ("loaded from cache" if cached else "built")
    print(f"native kernel {what} in {time.perf_counter() - t0:.2f} s ({native.cache_dir()})")


def _source() -> str:
    from quarl.formats.native_source import SOURCE

    return SOURCE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="testbed:tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--stats-every", type=int, default=16)
    p.add_argument("--percall-only", action="store_true")
    p.add_argument("--kv-cache", default=None, help="also run each variant with this injection.kv_cache format "
                   "(fp8_e4m3, nvfp4, ...) and print its cost: the median per-round ratio to the same run without it")
    p.add_argument("--no-percall", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # 1 is the most stable choice on a shared machine
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads")
    native_first_use()
    if not args.percall_only:
        bench_rollout(args, device)
    if not args.no_percall:
        percall(device)
    if device.type == "cuda":
        hbm(device)


def bench_rollout(args: argparse.Namespace, device: torch.device) -> None:
    from quarl.models import load_model

    model, tok = load_model(args.model, device=str(device))
    ids, mask = _encode(tok, _prompts(args.model, tok, args.batch), device)
    n_tok = args.batch * args.new_tokens
    print(f"{args.model}: {model.num_parameters() / 1e6:.2f}M params, batch {args.batch}, prompt {ids.shape[1]} "
          f"tokens, {args.new_tokens} new tokens per row (EOS ignored)")
    models = {"unquantized": model}
    injectors = {}
    for label, scheme in SCHEMES.items():  # one copy per variant: the unquantized model carries no hooks at all
        models[label] = copy.deepcopy(model)
        injectors[label] = attach(models[label], InjectionSpec(scheme=scheme), phase="rollout",
                                  stats_every=args.stats_every)
    if args.kv_cache:  # the same variants with the KV cache quantized (target: <= 1.2x the run without it)
        for label, scheme in [("unquantized", None), *SCHEMES.items()]:
            models[f"{label} + KV"] = copy.deepcopy(model)
            injectors[f"{label} + KV"] = attach(models[f"{label} + KV"], InjectionSpec(
                scheme=scheme, kv_cache=args.kv_cache), phase="rollout", stats_every=args.stats_every)
    times: dict[str, list[float]] = {k: [] for k in models}
    first: dict[str, float] = {}

    def run(label: str) -> float:
        return rollout(models[label], ids, mask, args.new_tokens)[0]

    for label in times:
        first[label] = run(label)
    for _ in range(args.reps):
        for label in times:
            times[label].append(run(label))
    base = min(times["unquantized"])
    for label, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times["unquantized"]))
        print(f"{label:17s} first {first[label]:7.2f} s | min {min(ts):7.3f} s  {n_tok / min(ts):8.0f} tok/s  "
              f"ratio(min) {min(ts) / base:5.2f}x  ratio(median/round) {ratio:5.2f}x")
    for label in [k for k in times if k.endswith(" + KV")]:
        cost = statistics.median(t / b for t, b in zip(times[label], times[label.removesuffix(" + KV")]))
        print(f"KV cache {args.kv_cache} cost on {label.removesuffix(' + KV')}: {cost:5.2f}x (median per round)")
    for inj in injectors.values():
        inj.check_fired("rollout")
        inj.detach()


if __name__ == "__main__":
    main()
