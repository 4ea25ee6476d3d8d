"""``quarl train``: GRPO + LoRA over the quantized model (see `quarl.rl`).

    quarl train CONFIG.yaml [--set grpo.steps=50 --set aqn.enabled=false] [--out DIR]
    quarl train --resume runs/<id>          # continue a killed run from its newest complete checkpoint
    quarl train --example                   # print a commented, ready-to-run testbed config (its header names the
                                            # variants, e.g. --set grpo.tis_cap=2.0 for TIS)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib import resources

EXAMPLE = "testbed_w4a4.yaml"  # the one shipped example; its variants are --set overrides named in its header


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="GRPO + LoRA training under emulated quantization (TRL)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?",
                   help="train config YAML, or - for stdin (blocks: model data injection aqn lora grpo eval run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override one config value (strict: unknown keys are errors); repeatable")
    p.add_argument("--out", help="run directory (default runs/<name>-<config hash>-s<seed>; never overwritten)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest complete checkpoint")
    p.add_argument("--example", action="store_true",
                   help="print the example config (MXFP4 W4A4 + STE + AQN on the testbed; variants as --set) and exit")
    p.set_defaults(func=run)


def process_settings() -> None:
    """The process-wide settings of a ``quarl train`` / ``quarl demo`` process (the library's `train` changes none).

    - ``HF_HUB_OFFLINE=1`` and ``HF_HUB_DISABLE_TELEMETRY=1`` unless already set: models and datasets come from local
      files or the Hugging Face cache, and a missing one fails at once naming where it was looked for (set
      ``HF_HUB_OFFLINE=0`` to download);
    - transformers 5 warns on every step that TRL still uses the old ``gradient_checkpointing`` attribute names; those
      two FutureWarnings are ignored;
    - ``train.log`` records quarl's INFO lines: the ``quarl`` logger goes down to INFO, and each console handler
      without a level gets the root logger's level, so the console shows what ``-v`` asked for and no more.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    for message in ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(root.getEffectiveLevel())
    quarl = logging.getLogger("quarl")
    if quarl.getEffectiveLevel() > logging.INFO:
        quarl.setLevel(logging.INFO)


def example_text() -> str:
    """The shipped example config (YAML with its comments)."""
    return resources.files("quarl").joinpath(f"assets/configs/{EXAMPLE}").read_text()


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
        sys.stdout.write(example_text())
        return 0
    if not args.config and not args.resume:
        print("quarl train: give a CONFIG.yaml, --resume DIR or --example", file=sys.stderr)
        return 2
    process_settings()
    try:
        from quarl.rl import train
        from quarl.rl.trl_contract import check_trl

        check_trl()
        config = sys.stdin.read() + "\n" if args.config == "-" else args.config  # "-": YAML on stdin
        run_dir = train(config, args.overrides, args.out, args.resume)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as exc:
        print(f"quarl train: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(_summary(run_dir)))
    return 0
