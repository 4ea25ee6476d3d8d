"""`quarl diagnose`: why would this quantization break this model? Table on stdout, optional JSON and PNG.

    quarl diagnose --model testbed:tiny --scheme MXFP4 [--json out.json] [--plot out.png] [--sensitivity]
    quarl diagnose --model smollm2 --spec my_spec.yaml --sensitivity block --noise --nll
    quarl diagnose --model ckpt/testbed-nvfp4      # a compressed-tensors checkpoint (see below)
    quarl diagnose --model testbed:tiny --scheme MXFP4 --sensitivity --plan 0.1 --plan-out plan.yaml
    quarl diagnose --model testbed:tiny --hardware nvidia-h100-fp8   # prints the preset's explicit fields first

``--plan BUDGET`` proposes a precision plan from the per-module sensitivity ranking: the modules whose quantization
costs most (KL) kept in ``--plan-format`` (default full precision) while their matmul parameters fit BUDGET, a
fraction of the selected modules' parameters; it is written as a ``quarl train`` config (``model`` + ``injection``
with the plan; every other block at its default), to train with as is or to copy the ``injection`` block from.

A compressed-tensors checkpoint (``quarl quantize``, llm-compressor) is loaded with its dequantized weights in plain
linear layers; its scheme is printed, and without --scheme/--spec/--error-type the diagnosed injection is the
checkpoint's own input quantization (dynamic per-tensor scale), so the report shows what its W4A4 / FP8 activations
cost on top of its already-quantized weights. A weight-only checkpoint needs an explicit injection.

Exit status 1 when the diagnosis finds an error (a declared injection never fired, gradients cut); 2 for an
invalid spec or unreadable prompt file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from quarl.inject.hardware import HARDWARE
from quarl.inject.hardware import describe as describe_hardware
from quarl.inject.spec import SCHEMES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="per-layer error, logits KL, gradient flow and sensitivity of an injection")
    # --- model ---
    p.add_argument("--model", required=True, help="model spec for quarl.models.load_model (e.g. testbed:tiny)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="parameter dtype")
    p.add_argument("--device", default="cpu", help="torch device")
    # --- injection (a scheme, a YAML spec, or explicit fields) ---
    p.add_argument("--scheme", choices=list(SCHEMES), help="named scheme (expands to error_type + injection_point)")
    p.add_argument("--spec", type=Path, help="InjectionSpec YAML file (strict)")
    p.add_argument("--hardware", choices=sorted(HARDWARE), help="named chip preset (expands into explicit fields)")
    p.add_argument("--error-type", help="a quarl.formats name or relative_gaussian | absolute_gaussian | ...")
    p.add_argument("--error-scale", type=float, help="sigma / bias / threshold of the noise models")
    p.add_argument("--injection-point", choices=["weight", "input", "output", "both"], help="where the error enters")
    p.add_argument("--apply-during", default="both", choices=["rollout", "training", "both"], help="phases")
    p.add_argument("--no-ste", action="store_true", help="cut the gradient (reproduces the W4A4 no-STE failure)")
    p.add_argument("--rotation", choices=["none", "block", "full"], help="randomized Hadamard on both operands")
    # --- inputs ---
    p.add_argument("--prompts", type=Path, help="JSONL ({'prompt', optional 'reference'}) or one prompt per line")
    p.add_argument("--nll", action="store_true", help="score per-token NLL on the built-in reference answers")
    p.add_argument("--max-length", type=int, default=512, help="truncate each prompt (+ reference) to this many tokens")
    # --- checks and outputs ---
    p.add_argument("--sensitivity", nargs="?", const="layer", choices=["layer", "block"], help="scan one unit at a time")
    p.add_argument("--noise", action="store_true", help="scan with equal-size relative-gaussian noise instead")
    p.add_argument("--noise-scale", type=float, help="noise sigma for --noise (default: each unit's measured error)")
    p.add_argument("--no-grad-check", action="store_true", help="skip the gradient-flow check")
    p.add_argument("--plan", type=float, metavar="BUDGET", help="propose a precision plan within BUDGET (fraction "
                   "of linear parameters) from the layer sensitivity scan")
    p.add_argument("--plan-format", default="none", help="format of the modules the plan keeps ('none' = full)")
    p.add_argument("--plan-out", type=Path, default=Path("plan.yaml"), help="where --plan writes its train config")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG of per-layer damage")
    p.set_defaults(func=_run)


def _spec(args: argparse.Namespace):
    from quarl.inject import InjectionSpec

    if args.spec:
        spec = InjectionSpec.from_yaml(args.spec)
        return spec.replace(rotation=args.rotation) if args.rotation else spec
    return InjectionSpec(scheme=args.scheme, error_type=args.error_type, error_scale=args.error_scale,
                         hardware=args.hardware, injection_point=args.injection_point, apply_during=args.apply_during,
                         use_ste=not args.no_ste, rotation=args.rotation or "none")


def _inputs(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    from quarl.diagnose import DEFAULT_PROMPTS, DEFAULT_REFERENCES

    if args.prompts is None:
        return list(DEFAULT_PROMPTS), (list(DEFAULT_REFERENCES) if args.nll else None)
    lines = [ln for ln in args.prompts.read_text().splitlines() if ln.strip()]
    if not lines[0].lstrip().startswith("{"):
        return lines, None
    rows = [json.loads(ln) for ln in lines]
    refs = [r["reference"] for r in rows] if all("reference" in r for r in rows) else None
    return [r["prompt"] for r in rows], refs


def _checkpoint_spec(args: argparse.Namespace, info):
    """The checkpoint's own input quantization as an injection (on its dequantized weights)."""
    from quarl.inject import InjectionSpec

    scheme = info.scheme
    if scheme.input_format is None:
        raise ValueError(f"{args.model} is a weight-only {scheme.name} checkpoint: its quantization is already in the "
                         "weights; pass --scheme/--spec/--error-type to diagnose an injection on top of it")
    return InjectionSpec(error_type=scheme.input_format, format_options=dict(scheme.input_options),
                         injection_point="input", apply_during=args.apply_during, use_ste=not args.no_ste)


def _run(args: argparse.Namespace) -> int:
    import quarl.models
    from quarl.checkpoint import is_compressed_tensors_dir, load_checkpoint
    from quarl.diagnose import diagnose, plot_damage

    checkpoint = is_compressed_tensors_dir(args.model)
    explicit = bool(args.spec or args.scheme or args.error_type or args.hardware)
    if args.plan is not None:
        if args.sensitivity == "block":
            print("quarl diagnose: --plan proposes modules: it needs --sensitivity layer", file=sys.stderr)
            return 2
        args.sensitivity = "layer"
    try:
        spec = _spec(args) if explicit or not checkpoint else None
        prompts, references = _inputs(args)
        if checkpoint:
            model, tokenizer, info = load_checkpoint(args.model, dtype=quarl.models.load.resolve_dtype(args.dtype),
                                                     device=args.device, dense=True)
            print(f"checkpoint: {info.summary()}")
            spec = spec or _checkpoint_spec(args, info)
    except (ValueError, OSError) as exc:
        print(f"quarl diagnose: {exc}", file=sys.stderr)
        return 2
    if spec is not None and spec.hardware:  # a preset is never hidden: print what it expanded into
        print(f"hardware {spec.hardware}: {describe_hardware(spec.hardware)}")
    if not checkpoint:
        model, tokenizer = quarl.models.load_model(args.model, dtype=args.dtype, device=args.device)
    report = diagnose(model, spec, tokenizer=tokenizer, prompts=prompts, references=references,
                      check_gradients=not args.no_grad_check, sensitivity=args.sensitivity,
                      sensitivity_noise=args.noise, noise_scale=args.noise_scale, max_length=args.max_length)
    print(report.table(), end="")
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_damage(report, args.plot)}")
    if args.plan is not None:
        try:
            _write_plan(args, model, spec, report)
        except ValueError as exc:
            print(f"quarl diagnose: {exc}", file=sys.stderr)
            return 2
    return 0 if report.ok else 1


def _write_plan(args: argparse.Namespace, model, spec, report) -> None:
    """Propose a plan from the layer ranking and write it as a `quarl train` config (strictly re-loaded)."""
    from quarl.diagnose.sensitivity import propose_plan
    from quarl.rl.config import ModelBlock, TrainConfig, load_config

    plan, chosen, share = propose_plan(model, spec, report.sensitivity, args.plan, args.plan_format)
    cfg = TrainConfig(model=ModelBlock(name=args.model), injection=spec.replace(plan=plan))
    header = (f"quarl train {args.plan_out}\nproposed by quarl diagnose --sensitivity --plan {args.plan}: "
              f"{len(chosen)} modules ({share:.2%} of the linear parameters) kept in {_kept(args.plan_format)}, most "
              "damaging (KL) first")
    cfg.to_yaml(args.plan_out, header=header)
    load_config(args.plan_out)  # what quarl train will read
    print(f"plan: {len(chosen)} modules in {_kept(args.plan_format)} ({share:.2%} of the linear parameters, budget "
          f"{args.plan:.2%}): {', '.join(chosen[:6])}{' ...' if len(chosen) > 6 else ''}")
    print(f"wrote {args.plan_out} (quarl train {args.plan_out})")


def _kept(fmt: str) -> str:
    return "full precision" if fmt == "none" else fmt
