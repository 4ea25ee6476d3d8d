"""`quarl calibrate`: static activation scales for an injection, calibrated as `quarl quantize` calibrates a checkpoint.

    quarl calibrate testbed:tiny --scheme NVFP4 --out nvfp4_static.yaml
    quarl calibrate smollm2 --spec my_fp8.yaml --calibration synthetic --calibration-n 64 --out fp8_static.yaml
    quarl diagnose --model testbed:tiny --spec nvfp4_static.yaml       # shows "static (calibrated amax ...)"

Writes the InjectionSpec as YAML with ``input_scale: static`` and ``input_amax`` (one calibrated input amax per
selected module), headed by the command that made it; ``quarl diagnose --spec``, ``InjectionSpec.from_yaml`` and the
``injection`` section of a ``quarl train`` config read it. The calibration batches are the ones ``quarl quantize``
uses (``--calibration``: question + reference solution of ``--calibration-n`` problems).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from quarl.inject.spec import SCHEMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate static NVFP4 / FP8 input scales for an injection (spec YAML)")
    # model and output
    p.add_argument("model", help="anything quarl.models.load_model accepts: testbed:tiny | smollm2 | HF id or dir")
    p.add_argument("--out", required=True, type=Path, help="the calibrated InjectionSpec YAML (never overwritten)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="model load dtype")
    # the injection to calibrate (an nvfp4 / fp8 input format)
    p.add_argument("--scheme", choices=list(SCHEMES), help="named scheme (NVFP4, FP8, W4A4 --error-type nvfp4)")
    p.add_argument("--spec", type=Path, help="InjectionSpec YAML file (strict) instead of --scheme")
    p.add_argument("--error-type", help="format of weights/inputs (nvfp4 | fp8_e4m3 | fp8_e5m2)")
    p.add_argument("--injection-point", choices=["input", "both"], help="with --error-type (default both)")
    # calibration data (the same batches as quarl quantize)
    p.add_argument("--calibration", default="synthetic", help="data source (quarl eval --data)")
    p.add_argument("--calibration-n", type=int, default=32, help="calibration problems")
    p.add_argument("--calibration-batch", type=int, default=8, help="problems per calibration forward")
    p.set_defaults(func=_run)


def _spec(args: argparse.Namespace):
    from quarl.inject import InjectionSpec

    if args.spec:
        return InjectionSpec.from_yaml(args.spec)
    point = args.injection_point or ("both" if args.error_type else None)
    return InjectionSpec(scheme=args.scheme, error_type=args.error_type, injection_point=point)


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this calibration (the YAML header)."""
    flags = {"--scheme": args.scheme, "--spec": args.spec, "--error-type": args.error_type,
             "--injection-point": args.injection_point, "--dtype": args.dtype, "--calibration": args.calibration,
             "--calibration-n": args.calibration_n, "--calibration-batch": args.calibration_batch, "--out": args.out}
    parts = ["quarl calibrate", shlex.quote(args.model)]
    parts += [f"{flag} {shlex.quote(str(value))}" for flag, value in flags.items() if value is not None]
    return " ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from quarl.checkpoint.calibrate import calibrate_spec
    from quarl.cli.quantize import _calibration
    from quarl.models import ModelNotFoundError, load_model

    if args.out.exists():
        print(f"quarl calibrate: {args.out} exists; choose another --out", file=sys.stderr)
        return 2
    try:
        spec = _spec(args)
        spec.replace(input_scale="static", input_amax={"": 1.0})  # fail before loading anything
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        calibrated = calibrate_spec(model, spec, _calibration(args, tokenizer))
    except (ModelNotFoundError, ValueError, OSError) as exc:
        print(f"quarl calibrate: {exc}", file=sys.stderr)
        return 2
    header = (f"{_command(args)}\n"
              f"static input scales of {args.model}: {args.calibration_n} {args.calibration} problems")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibrated.to_yaml(args.out, header=header)
    values = calibrated.input_amax.values()
    print(f"calibrated {len(calibrated.input_amax)} modules ({calibrated.error_type} inputs, amax "
          f"{min(values):.4g} .. {max(values):.4g}) on {args.calibration_n} {args.calibration} problems")
    print(f"wrote {args.out}")
    return 0
