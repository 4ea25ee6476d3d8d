"""`quarl testbed`: rebuild the embedded testbed model, or print its quantization report.

    quarl testbed build --out testbed_build [--compare]  # ~12-17 min on one CPU core; = the shipped checkpoint
    quarl testbed build --config my.yaml --out exp1       # a variant (strict TestbedConfig YAML, see build_config.yaml)
    quarl testbed report --n 500                          # the README table (accuracy, 95% CI, format compliance)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm.auto import tqdm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("testbed", help="build the embedded testbed model or print its quantization report")
    tsub = p.add_subparsers(dest="testbed_command", metavar="ACTION", required=True)

    # --- build ---
    b = tsub.add_parser("build", help="pre-train the testbed from its seed (deterministic, 1 thread; ~12-17 min)")
    b.add_argument("--out", type=Path, default=Path("testbed_build"), help="output directory")
    b.add_argument("--config", type=Path, default=None,
                   help="build from this TestbedConfig YAML (e.g. a build_config.yaml) instead of the defaults")
    b.add_argument("--compare", action="store_true",
                   help="afterwards, compare the result bit-for-bit with the checkpoint shipped in the package")
    b.set_defaults(func=_build)

    # --- report ---
    r = tsub.add_parser("report", help="held-out accuracy unquantized / W4A16 / W4A4 x MXFP4 / NVFP4 (markdown)")
    r.add_argument("--model", default="testbed:tiny", help="model spec for quarl.models.load_model")
    r.add_argument("--n", type=int, default=500, help="held-out problems per row")
    r.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    r.set_defaults(func=_report)


def _build(args: argparse.Namespace) -> int:
    from quarl.models.build import build_testbed, compare_checkpoints
    from quarl.models.load import testbed_dir
    from quarl import configio
    from quarl.models.testbed import DEFAULT_CONFIG, TestbedConfig

    cfg = DEFAULT_CONFIG if args.config is None else configio.load_yaml(TestbedConfig, args.config)
    bar = tqdm(total=cfg.train.steps, desc="testbed pre-training", unit="step")

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    report = build_testbed(args.out, cfg, on_step)
    bar.close()
    print((args.out / "build_report.md").read_text())
    print(f"wrote {args.out}/ (checkpoint, build_report.md, loss_curve.png) in {report['train_seconds']} s training")
    if args.compare:
        diffs = compare_checkpoints(args.out, testbed_dir())
        print("bit-identical to the shipped checkpoint" if not diffs else "differs from the shipped checkpoint:")
        for d in diffs:
            print(f"  {d}")
        return 1 if diffs else 0
    return 0


def _report(args: argparse.Namespace) -> int:
    from quarl.models.build import markdown_table, quant_report
    from quarl.models.load import load_model

    model, tokenizer = load_model(args.model)
    rows = quant_report(model, tokenizer, n=args.n,
                        on_row=lambda r: print(f"{r.label}: {100 * r.accuracy:.1f}% ({r.seconds:.0f} s)", flush=True))
    table = markdown_table(rows)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0
