"""`quarl quantize`: write a pre-quantized compressed-tensors checkpoint (the format llm-compressor writes, vLLM serves).

    quarl quantize testbed:tiny --scheme NVFP4A16 --out ckpt/testbed-nvfp4a16
    quarl quantize smollm2 --scheme NVFP4 --out ckpt/smollm2-nvfp4 --calibration synthetic --calibration-n 64
    quarl eval --model ckpt/testbed-nvfp4a16          # load_model recognizes the directory by its quantization_config

Static input scales (NVFP4's ``input_global_scale``, FP8's ``input_scale``) are calibrated on ``--calibration-n``
problems of ``--calibration`` (question + reference solution, the text a rollout and its training forward see).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCHEME_CHOICES = ("NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "W4A16", "FP8")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="export a compressed-tensors checkpoint (NVFP4 / MXFP4 / INT4 / FP8)")
    # model and output
    p.add_argument("model", help="anything quarl.models.load_model accepts: testbed:tiny | smollm2 | HF id or dir")
    p.add_argument("--scheme", required=True, choices=SCHEME_CHOICES,
                   help="compressed-tensors preset (W4A16 = INT4 group 128, as in compressed-tensors)")
    p.add_argument("--out", required=True, type=Path, help="new (or empty) output directory")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="load dtype of the source model (default: its own)")
    # what to quantize
    p.add_argument("--ignore", nargs="*", default=["lm_head"],
                   help="module names (or re:<regex>) kept in full precision (default: lm_head)")
    p.add_argument("--no-fuse-global-scales", action="store_true",
                   help="NVFP4: one weight global scale per module instead of llm-compressor's shared q/k/v, gate/up")
    # calibration (static input scales)
    p.add_argument("--calibration", default="synthetic", help="data source for static input scales (quarl eval --data)")
    p.add_argument("--calibration-n", type=int, default=32, help="calibration problems")
    p.add_argument("--calibration-batch", type=int, default=8, help="problems per calibration forward")
    p.add_argument("--no-progress", action="store_true", help="hide the per-layer progress bar")
    p.set_defaults(func=_run)


def _calibration(args: argparse.Namespace, tokenizer) -> list[dict]:
    """Tokenized calibration batches (right-padded, with attention masks)."""
    from quarl.data.sources import load_source

    problems = load_source(args.calibration, n=args.calibration_n, split="train")
    texts = [f"{p.question} {p.answer}" for p in problems]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    step = args.calibration_batch
    return [dict(tokenizer(texts[i:i + step], return_tensors="pt", padding=True, truncation=True, max_length=512))
            for i in range(0, len(texts), step)]


def _run(args: argparse.Namespace) -> int:
    from quarl.checkpoint import export_checkpoint, get_scheme
    from quarl.models import ModelNotFoundError, load_model

    scheme = get_scheme(args.scheme)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"quarl quantize: {args.out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        calibration = _calibration(args, tokenizer) if scheme.static_input else None
    except (ModelNotFoundError, ValueError, OSError) as exc:
        print(f"quarl quantize: {exc}", file=sys.stderr)
        return 2
    try:
        report = export_checkpoint(model, tokenizer, scheme, args.out, calibration=calibration, ignore=args.ignore,
                                   fuse_global_scales=None if not args.no_fuse_global_scales else False,
                                   progress=not args.no_progress)
    except ValueError as exc:  # a scheme the model cannot be exported in (e.g. static input scales on MoE experts)
        print(f"quarl quantize: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.out} ({scheme.name}, compressed-tensors {scheme.ct_format})")
    print(f"quantized {report.modules} linear modules ({report.params} weights): {report.packed_bytes} bytes packed "
          f"vs {report.bf16_bytes} bf16 ({report.bf16_bytes / report.packed_bytes:.2f}x)")
    print(f"whole checkpoint: {report.checkpoint_bytes} bytes vs {report.checkpoint_bf16_bytes} bf16 "
          f"(embeddings, norms and ignored modules stay dense)")
    if report.fused_groups:
        print(f"NVFP4 weight global scales shared over {report.fused_groups} q/k/v and gate/up groups")
    if calibration is not None:
        print(f"static input scales calibrated on {args.calibration_n} {args.calibration} problems")
    return 0
