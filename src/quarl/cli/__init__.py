"""The ``quarl`` command line: argparse subcommands that parse, build a config and call the library.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code). Handlers only parse,
build configs and call library functions; they own stdout (library code only logs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order they appear in ``quarl --help``.
_SUBCOMMANDS = ("demo", "train", "suite", "runs", "table", "plot", "formats", "diagnose", "eval", "quantize", "calibrate",
               "testbed", "verl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quarl",
        description="quarl: quantization-aware RL for LLMs (bit-exact low-bit emulation, injection, GSM8K eval).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: INFO, -vv: DEBUG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        module = importlib.import_module(f"quarl.cli.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transformers imports torchao when it is installed (a test dependency); its optional-kernel warnings are noise.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
