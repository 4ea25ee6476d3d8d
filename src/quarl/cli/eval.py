"""`quarl eval`: evaluate a model on GSM8K-format problems, optionally under an injection spec.

    quarl eval --model testbed:tiny --data synthetic --n 500
    quarl eval --model testbed:tiny --scheme W4A4 --out runs/eval/w4a4
    quarl eval --model Qwen/Qwen2.5-1.5B-Instruct --data gsm8k --spec spec.yaml --samples 8 --temperature 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
from pathlib import Path

import yaml

from quarl.data.sources import NAMED_SOURCES, load_source
from quarl.eval.gsm8k import Scorer
from quarl.eval.harness import EvalConfig, GenerationConfig, PromptStyle, run_eval
from quarl.eval.results import summary_lines, verl_lines, write_run
from quarl.inject import SCHEMES, InjectionSpec, Phase

DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="GSM8K-format evaluation (verl scoring, CIs, optional quantization)")
    # model and data
    p.add_argument("--model", default="testbed:tiny", help="testbed:tiny | smollm2 | HF id or dir | .gguf")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--data", default="synthetic",
                   help=f"{' | '.join(NAMED_SOURCES)} | path.jsonl | path.parquet | datasets dir | HF dataset id")
    p.add_argument("--split", default="test", choices=("train", "test"), help="data split")
    p.add_argument("--n", type=int, default=500, help="number of problems (0: all of a file/dataset)")
    p.add_argument("--data-seed", type=int, default=None, help="generator seed for synthetic/gsm_symbolic")
    # quantization
    q = p.add_mutually_exclusive_group()
    q.add_argument("--scheme", choices=sorted(SCHEMES), help="evaluate under InjectionSpec(scheme=...)")
    q.add_argument("--spec", type=Path, help="evaluate under an InjectionSpec YAML file")
    p.add_argument("--phase", default="rollout", choices=[ph.value for ph in Phase], help="injector phase")
    # generation
    p.add_argument("--batch-size", type=int, default=16, help="problems per batch")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per completion")
    p.add_argument("--samples", type=int, default=1, help="completions per problem (k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when sampling")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # scoring and output
    p.add_argument("--scorer", default="strict", choices=[s.value for s in Scorer], help="per-sample `correct`")
    p.add_argument("--prompt-style", default="auto", choices=[s.value for s in PromptStyle], help="chat template?")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/eval/<time>-<model>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:  # every user-input error (bad spec file, unknown data source or model, used --out) is one line, rc 2
        cfg, spec, problems, out = _prepare(args)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        checkpoint = getattr(model, "quarl_checkpoint", None)
        if checkpoint is not None and spec is not None:
            raise ValueError(f"{args.model} is a pre-quantized {checkpoint.scheme.name} checkpoint; its weights are "
                             "already quantized, so --scheme/--spec on top is not supported (evaluate it as is)")
    except Exception as exc:
        if not _is_input_error(exc):
            raise
        print("quarl eval: " + re.sub(r"\s*\n\s*", " ", str(exc)), file=sys.stderr)  # one line, also for hub errors
        return 2
    result = run_eval(model, tokenizer, problems, cfg, spec=spec, progress=not args.no_progress)
    config = {"model": args.model, "dtype": args.dtype, "device": args.device, "data": args.data,
              "split": args.split, "n": len(problems), "data_seed": args.data_seed,
              "eval": dataclasses.asdict(cfg), "spec": spec.to_dict() if spec else None,
              "checkpoint": checkpoint.as_dict() if checkpoint is not None else None}
    write_run(out, result.samples, result.metrics, result.quantization, config)
    for line in summary_lines(result.metrics) + verl_lines(result.metrics):
        print(line)
    if result.quantization:
        print(f"quantization applied: {result.quantization['modules_injected']} modules, "
              f"{result.quantization['hook_fires']} hook fires in phase {result.quantization['phase']!r}")
        kept = [m for m, f in result.quantization.get("formats", {}).items() if f.startswith("none")]
        if kept:  # a precision plan: say what stayed unquantized
            more = " ..." if len(kept) > 6 else ""
            print(f"precision plan: {len(kept)} modules unquantized: {', '.join(kept[:6])}{more}")
    if checkpoint is not None:
        print(f"checkpoint: {checkpoint.summary()}")
        print(f"quantization applied: {_packed_calls(model)} packed-module forwards ({checkpoint.scheme.name})")
    timing = result.metrics["timing"]
    print(f"generated {timing['generated_tokens']} tokens in {timing['wall_s']:.1f}s "
          f"({timing['tokens_per_s']:.1f} tokens/s)")
    print(f"results: {out}/summary.json, {out}/samples.jsonl")
    return 0


def _prepare(args: argparse.Namespace) -> tuple[EvalConfig, InjectionSpec | None, list, Path]:
    """Configs, spec, problems and the output directory, each validated before the model is loaded."""
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    cfg = EvalConfig(generation=gen, scorer=args.scorer, prompt_style=args.prompt_style, phase=args.phase)
    spec = InjectionSpec.from_yaml(args.spec) if args.spec else (InjectionSpec(scheme=args.scheme) if args.scheme
                                                                   else None)
    out = args.out or _default_out(args.model, args.scheme or (args.spec and args.spec.stem))
    for name in ("summary.json", "samples.jsonl"):  # write_run refuses these too, but only after the whole eval
        if (out / name).exists():
            raise FileExistsError(f"{out / name} exists; results are never overwritten (choose another --out)")
    problems = load_source(args.data, n=args.n or None, split=args.split, seed=args.data_seed)
    return cfg, spec, problems, out


def _packed_calls(model) -> int:
    """Forwards run by a checkpoint's packed modules (the quantization actually applied, like hook telemetry)."""
    from quarl.checkpoint import CompressedLinear

    return sum(m.calls for m in model.modules() if isinstance(m, CompressedLinear))


def _is_input_error(exc: Exception) -> bool:
    """Errors that mean bad input (printed as one line), as opposed to bugs (which keep their traceback)."""
    if isinstance(exc, (ValueError, OSError, yaml.YAMLError)):
        return True
    from quarl.models import ModelNotFoundError  # imported on use only: quarl.models imports transformers

    return isinstance(exc, ModelNotFoundError)


def load_model(spec: str, **kwargs):
    """Import the loader on use: transformers costs seconds, and every other subcommand would pay it at start-up."""
    from quarl.models.load import load_model as _load_model

    return _load_model(spec, **kwargs)


def _default_out(model: str, quant: str | None) -> Path:
    """runs/eval/<UTC time>-<model>[-<scheme>]: a fresh directory per run, so results are never overwritten."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{quant}" if quant else model)
    return Path("runs") / "eval" / f"{stamp}-{slug}"
