"""``quarl train``: GRPO + LoRA over the quantized model (see `quarl.rl`).

    quarl train CONFIG.yaml [--set grpo.steps=50 --set aqn.enabled=false] [--out DIR]
    quarl train --resume runs/<id>          # continue a killed run from its newest complete checkpoint
    quarl train --example [tis]             # print a commented, ready-to-run testbed config
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources

EXAMPLES = {"w4a4": "testbed_w4a4.yaml", "tis": "testbed_w4a4_tis.yaml"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="GRPO + LoRA training under emulated quantization (TRL)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?",
                   help="train config YAML, or - for stdin (blocks: model data injection aqn lora grpo eval run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override one config value (strict: unknown keys are errors); repeatable")
    p.add_argument("--out", help="run directory (default runs/<name>-<config hash>-s<seed>; never overwritten)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest complete checkpoint")
    p.add_argument("--example", nargs="?", const="w4a4", choices=sorted(EXAMPLES),
                   help="print an example config (w4a4: MXFP4 W4A4 + AQN; tis: the same with TIS) and exit")
    p.set_defaults(func=run)


def example_text(name: str = "w4a4") -> str:
    return resources.files("quarl").joinpath(f"assets/configs/{EXAMPLES[name]}").read_text()


def _summary(run_dir) -> list[str]:
    from quarl.runs import read_metrics

    vals = [r for r in read_metrics(run_dir) if "val/acc_strict" in r]
    lines = [f"run directory: {run_dir}"]
    if vals:
        first, last = vals[0], vals[-1]
        fmt = lambda r: (f"{100 * r['val/acc_strict']:.1f}% [{100 * r['val/acc_strict_lo']:.1f}, "  # noqa: E731
                         f"{100 * r['val/acc_strict_hi']:.1f}]")
        lines.append(f"validation (strict, n={last['val/n']}): step {first['step']} {fmt(first)} -> step "
                     f"{last['step']} {fmt(last)}  ({100 * (last['val/acc_strict'] - first['val/acc_strict']):+.1f})")
    lines.append(f"metrics: {run_dir}/metrics.jsonl   TensorBoard: tensorboard --logdir {run_dir}/tb")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.example:
        sys.stdout.write(example_text(args.example))
        return 0
    if not args.config and not args.resume:
        print("quarl train: give a CONFIG.yaml, --resume DIR or --example", file=sys.stderr)
        return 2
    try:
        from quarl.rl import train
        from quarl.rl.engine import check_trl

        check_trl()
        config = sys.stdin.read() + "\n" if args.config == "-" else args.config  # "-": YAML on stdin
        run_dir = train(config, args.overrides, args.out, args.resume)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as exc:
        print(f"quarl train: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(_summary(run_dir)))
    return 0
