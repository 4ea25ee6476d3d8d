"""`quarl demo`: the offline showcase — what 4-bit emulation does to a model, measured honestly, in about a minute.

    quarl demo [--n 200] [--out runs/demo/<time>]

Three steps, all offline on the CPU, on the embedded testbed model shipped with quarl:
1. formats: error of MXFP4 / NVFP4 fake quantization (bit-exact emulation) on a random tensor;
2. accuracy: greedy GSM8K-format accuracy (verl strict scoring, 95% Wilson CIs) on held-out problems, unquantized and
   under W4A16 / W4A4 in MXFP4 and NVFP4, with the injection confirmed by hook telemetry;
3. diagnosis: `quarl diagnose` of MXFP4 W4A4 — per-layer error, logits KL, gradient flow through the STE, and the
   layers whose quantization hurts most.
Outputs (table, diagnosis JSON and PNG) go to a fresh run directory, never overwriting an earlier one.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline showcase: formats error, testbed accuracy under W4A16/W4A4, diagnosis")
    p.add_argument("--n", type=int, default=200, help="held-out problems per accuracy row")
    p.add_argument("--model", default="testbed:tiny", help="model spec for quarl.models.load_model")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo/<UTC time>)")
    p.set_defaults(func=_run)


def _formats_step() -> None:
    import torch

    from quarl.formats import error_stats, fake_quantize

    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for name in ("mxfp4", "nvfp4"):
        rel, sqnr, _ = error_stats(x, fake_quantize(x, name))
        print(f"  {name}: relative error {rel:.4f} | SQNR {sqnr:.2f} dB  (N(0,1) 256x512)")


def _run(args: argparse.Namespace) -> int:
    from quarl.diagnose import diagnose, plot_damage
    from quarl.inject import InjectionSpec
    from quarl.models.build import markdown_table, quant_report
    from quarl.models.load import load_model

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / "demo" / stamp
    if out.exists():
        print(f"quarl demo: {out} already exists; runs never overwrite each other (pick another --out)",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True)

    print("[1/3] formats: bit-exact 4-bit emulation error")
    _formats_step()

    print(f"\n[2/3] accuracy of {args.model} on {args.n} held-out problems (greedy, verl strict scoring)")
    model, tokenizer = load_model(args.model)
    rows = quant_report(model, tokenizer, n=args.n,
                        on_row=lambda r: print(f"  {r.label}: {100 * r.accuracy:.1f}% ({r.seconds:.0f} s)", flush=True))
    table = markdown_table(rows)
    (out / "accuracy.md").write_text(table + "\n")
    print(table)

    print("\n[3/3] diagnosis of MXFP4 W4A4 (per-layer error, KL, gradient flow, sensitivity)")
    report = diagnose(model, InjectionSpec(scheme="MXFP4"), tokenizer=tokenizer, sensitivity="layer")
    report.to_json(out / "diagnose.json")
    text = report.table()
    print("\n".join(text.splitlines()[:6]))
    lines = text.splitlines()
    print("  ...\n" + "\n".join(line for line in lines if line.startswith("gradient flow")))
    print("most damaging layers when quantized alone (KL vs clean, top-1 agreement):")
    print("\n".join(line for line in lines if line.startswith(("   1 ", "   2 ", "   3 "))))
    try:
        plot_damage(report, out / "diagnose.png")
    except ImportError:  # matplotlib is optional
        pass
    print(f"\nwrote {out}/ (accuracy.md, diagnose.json, diagnose.png)")
    return 0 if report.ok else 1
