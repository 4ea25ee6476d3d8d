"""`quarl demo`: quantization-aware RL on the embedded testbed, offline on 2 CPU cores, in under 10 minutes.

    quarl demo [--steps 40] [--n 500] [--out runs/demo/<time>] [--set grpo.lr=2.0e-4 ...]
    quarl demo --quick [--n 200]          # the one-minute showcase: formats error, accuracy table, diagnosis

The training demo:
1. validation accuracy of the shipped testbed, unquantized (fp32) and under MXFP4 W4A4, on the same held-out
   problems (greedy, verl strict scoring, 95% Wilson intervals);
2. a short GRPO + LoRA run under MXFP4 W4A4 (straight-through estimator on, QeRL AQN on the RMSNorm gains during
   rollouts) through `quarl train` — the shipped example config with fewer steps;
3. validation again under W4A4, the recovery as a paired 95% CI over the same problems, the share of the
   W4A4 -> fp32 gap closed, the seed-style table (table.md) and the curves (curves.png).
Everything goes to a fresh ``runs/demo/<UTC time>/`` (the run itself in its registry directory below it).

The quick showcase (``--quick``):
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
    p = sub.add_parser("demo", help="offline: GRPO + LoRA recovers W4A4 accuracy on the testbed (--quick: showcase)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the one-minute showcase instead (no training)")
    p.add_argument("--n", type=int, default=None, help="held-out problems (default 500; --quick: 200 per row)")
    p.add_argument("--steps", type=int, default=40, help="GRPO optimizer steps (16 prompts x 8 completions each)")
    p.add_argument("--model", default="testbed:tiny", help="model spec for quarl.models.load_model")
    p.add_argument("--out", type=Path, default=None, help="demo directory (default runs/demo/<UTC time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override the demo's train config (as quarl train --set); repeatable")
    p.set_defaults(func=_run)


def _formats_step() -> None:
    import torch

    from quarl.formats import error_stats, fake_quantize

    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for name in ("mxfp4", "nvfp4"):
        rel, sqnr, _ = error_stats(x, fake_quantize(x, name))
        print(f"  {name}: relative error {rel:.4f} | SQNR {sqnr:.2f} dB  (N(0,1) 256x512)")


def _run(args: argparse.Namespace) -> int:
    from quarl.cli.train import process_settings

    process_settings()  # offline hub, warning filters, logging levels (the library leaves them alone)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("runs") / "demo" / stamp
    if out.exists():
        print(f"quarl demo: {out} already exists; runs never overwrite each other (pick another --out)",
              file=sys.stderr)
        return 2
    if args.quick:
        out.mkdir(parents=True)
        return _quick(args, out)
    return _train_demo(args, out)


def _quick(args: argparse.Namespace, out: Path) -> int:
    from quarl.diagnose import diagnose, plot_damage
    from quarl.inject import InjectionSpec
    from quarl.models.build import markdown_table, quant_report
    from quarl.models.load import load_model

    args.n = args.n or 200

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


# --- the training demo --------------------------------------------------------------------------------------------


def _demo_config(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The shipped MXFP4 W4A4 + AQN example, shortened: validation at step 0, half way and the final step."""
    from quarl.cli.train import example_text

    steps, n = args.steps, args.n or 500
    overrides = [f"model.name={args.model}", f"grpo.steps={steps}", f"eval.n={n}", f"eval.every={max(1, steps // 2)}",
                 "eval.batch_size=100", "run.checkpoint_every=0", "run.name=demo", *args.overrides]
    return example_text(), overrides


def _baseline(cfg, out: Path) -> dict:
    """fp32 accuracy of the untrained model on the run's own validation problems, scored as the trainer scores."""
    import json

    from quarl.data.sources import load_source
    from quarl.eval.harness import run_eval
    from quarl.models.load import load_model

    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)
    problems = load_source(cfg.data.val_source or cfg.data.source, cfg.eval.n, "test")
    result = run_eval(model, tokenizer, problems, cfg.validation())
    correct = {s.id: bool(s.correct_strict) for s in result.samples}
    (out / "fp32_eval.jsonl").write_text("".join(json.dumps({"id": i, "correct_strict": c}) + "\n"
                                                 for i, c in correct.items()))
    return correct


def _verdict(delta) -> str:
    """A recovery is claimed only when the paired 95% CI lies above zero."""
    if delta.lo > 0:
        return "recovered (CI > 0)"
    return "worse (CI < 0)" if delta.hi < 0 else "not resolved (CI includes 0)"


def _demo_table(config: dict, fp32, w4a4_0, final, delta, verdict: str, steps: int, n_problems: int) -> str:
    from quarl.mdtable import render_table
    from quarl.runs.results import describe_config

    c = describe_config(config)
    head = ["ID", "description", "format", "injection", "phase", "STE", "AQN", "val acc step 0",
            f"val acc step {steps}", "Δ (paired 95% CI)", "status"]
    rows = [["fp32", "shipped model, unquantized, untrained", "fp32", "—", "—", "—", "off", fp32.fmt(), "—",
             "—", "reference"],
            ["demo", f"GRPO + LoRA, {steps} steps, under the injection", c["format"], c["injection"], c["phase"],
             c["ste"], c["aqn"], w4a4_0.fmt(), final.fmt(), ("+" if delta.mean > 0 else "") + delta.fmt(),
             verdict]]
    return render_table(head, rows) + (f"\n\nStrict validation accuracy in points on {n_problems} held-out "
                                       "problems (95% Wilson intervals); Δ is paired over the same problems "
                                       "(bootstrap).\n")


def _train_demo(args: argparse.Namespace, out: Path) -> int:
    from quarl.rl import load_config, train
    from quarl.rl.trl_contract import check_trl
    from quarl.runs import run_id
    from quarl.runs.plot import plot_groups
    from quarl.runs.results import read_eval
    from quarl.runs.stats import accuracy_interval, paired_difference
    from quarl.runs.table import run_groups

    base, overrides = _demo_config(args)
    try:
        cfg = load_config(base, overrides)  # first: a bad --set fails before TRL's slow import
        check_trl()
    except (ValueError, ImportError) as exc:
        print(f"quarl demo: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True)
    steps, n = cfg.grpo.steps, cfg.eval.n
    print(f"[1/3] fp32 accuracy of {cfg.model.name} on {n} held-out problems (greedy, verl strict scoring)")
    fp32_correct = _baseline(cfg, out)
    fp32 = accuracy_interval(sum(fp32_correct.values()), len(fp32_correct))
    print(f"  fp32: {fp32.fmt()} %")
    print(f"\n[2/3] GRPO + LoRA under MXFP4 W4A4 (STE on, AQN on): validation at step 0, then {steps} steps of "
          f"{cfg.grpo.prompts_per_step} prompts x {cfg.grpo.generations} completions")
    run_dir = train(base, overrides, out / run_id(cfg.to_dict(), cfg.run.seed, cfg.run.name))
    w4a4_0_c, final_c = read_eval(run_dir, 0), read_eval(run_dir, steps)
    w4a4_0 = accuracy_interval(sum(w4a4_0_c.values()), len(w4a4_0_c))
    final = accuracy_interval(sum(final_c.values()), len(final_c))
    delta = paired_difference(w4a4_0_c, final_c)
    verdict = _verdict(delta)
    print(f"\n[3/3] W4A4 step 0: {w4a4_0.fmt()} % -> step {steps}: {final.fmt()} %  (fp32: {fp32.fmt()} %)\n")
    table = _demo_table(cfg.to_dict(), fp32, w4a4_0, final, delta, verdict, steps, len(fp32_correct))
    (out / "table.md").write_text(table)
    print(table)
    gap = fp32.mean - w4a4_0.mean
    if delta.lo > 0:
        share = f", {100 * delta.mean / gap:.0f}% of the {gap:.1f}-point W4A4 -> fp32 gap" if gap > 0 else ""
        print(f"measured recovery: {delta.mean:+.1f} points [{delta.lo:+.1f}, {delta.hi:+.1f}] under W4A4 in "
              f"{steps} steps{share}")
    else:
        print(f"no recovery resolved at this budget: {delta.mean:+.1f} points [{delta.lo:+.1f}, {delta.hi:+.1f}] "
              f"(the 95% CI includes 0); try --steps {2 * steps} or --n {2 * n}")
    try:
        png = plot_groups(run_groups([run_dir]), out / "curves.png", title="quarl demo: MXFP4 W4A4 + GRPO/LoRA",
                          references={"fp32, untrained": fp32.mean})
        print(f"curves: {png}")
    except ImportError:  # matplotlib is optional (the plot extra)
        pass
    print(f"\nrun directory: {run_dir}   (quarl runs --root {out}; quarl table {run_dir})")
    print("next: quarl suite suites/e13.yaml --dry-run   the full W4A4 study: 9 cells x 3 seeds, expectations, CIs")
    print("      quarl train --example > my.yaml         then model.name: Qwen/Qwen2.5-1.5B-Instruct and "
          "data.source: gsm8k on a GPU")
    return 0
