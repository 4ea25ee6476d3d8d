"""`quarl formats`: list the low-bit formats, or show one format's value grid and its error on a random tensor.

    quarl formats                                   # table: name, element, block, scale, profiles
    quarl formats nvfp4                             # the representable element values
    quarl formats nvfp4 --sample                    # ... plus relative error, SQNR (dB), max abs error
    quarl formats mxfp4 --sample --scale-mode rceil --dist outliers --shape 256x512 --seed 1

Error statistics of `y = fake_quantize(x)` on `x` (fp32): relative error `||y - x|| / ||x||`,
`SQNR = 10 log10(sum x^2 / sum (y - x)^2)` dB (torchao `compute_error`), and `max |y - x|`.
An unknown format name exits with status 2 and the list of valid names (argparse `choices`); an option the format
does not take (e.g. `--scale-mode` for nvfp4) exits with status 2 and `get_format`'s message listing valid ones.
"""

from __future__ import annotations

import argparse
import sys

import torch

from quarl.formats import (FORMATS, Family, Profile, QFormat, RoundingMode, ScaleMode, error_stats, fake_quantize,
                           get_format)
from quarl.formats.spec import NF4_LEVELS, FloatSpec, IntSpec, float_code_table

_SCALE = {Family.MX: "E8M0 (power of two)", Family.NVFP4: "E4M3 x fp32 tensor", Family.SCALED: "fp32 absmax",
          Family.NF4: "fp32 absmax"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("formats", help="list formats; show a format's value grid and error stats (--sample)")
    p.add_argument("name", nargs="?", choices=list(FORMATS), metavar="NAME",
                   help=f"format to show: {', '.join(FORMATS)}")
    # --- format options (passed to quarl.formats.get_format) ---
    p.add_argument("--profile", choices=[m.value for m in Profile], help="reference to reproduce")
    p.add_argument("--scale-mode", choices=[m.value for m in ScaleMode], help="MX shared-scale rule")
    p.add_argument("--rounding", choices=[m.value for m in RoundingMode], help="element rounding")
    # --- sample tensor ---
    p.add_argument("--sample", action="store_true", help="quantize a random tensor and print error statistics")
    p.add_argument("--shape", type=_shape, default=(128, 256), help="sample shape, e.g. 128x256 (default)")
    p.add_argument("--seed", type=int, default=0, help="sample RNG seed")
    p.add_argument("--dist", default="normal", choices=["normal", "uniform", "outliers"], help="sample distribution")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.name is None:
        print(_table())
        return 0
    options = {k: v for k, v in (("profile", args.profile), ("scale_mode", args.scale_mode),
                                 ("rounding", args.rounding)) if v is not None}
    if options.get("rounding") == RoundingMode.STOCHASTIC.value:
        options["seed"] = args.seed
    try:
        fmt = get_format(args.name, **options)
    except ValueError as err:
        print(f"quarl formats: {err}", file=sys.stderr)
        return 2
    print(_describe(fmt))
    grid = _value_grid(fmt)
    print(f"non-negative element values ({len(grid)}): " + " ".join(f"{v:g}" for v in grid))
    if args.sample:
        x = _sample(args.shape, args.dist, args.seed)
        rel, sqnr, max_abs = error_stats(x, fake_quantize(x, fmt))
        print(f"sample: {args.dist} {'x'.join(map(str, args.shape))} seed {args.seed}")
        print(f"relative error {rel:.6g} | SQNR {sqnr:.2f} dB | max abs error {max_abs:.6g}")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    """`128x256` or `128,256` -> (128, 256)."""
    try:
        dims = tuple(int(d) for d in text.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 128x256, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"shape dims must be positive, got {text!r}")
    return dims


def _profiles(name: str) -> list[str]:
    """Profiles `get_format` accepts for `name` (asked through the public API)."""
    valid = []
    for prof in Profile:
        try:
            get_format(name, profile=prof.value)
        except ValueError:
            continue
        valid.append(prof.value)
    return valid


def _element(fmt: QFormat) -> str:
    if fmt.elem is None:
        return "nf4 levels (max 1)"
    return f"{fmt.elem.name} (max {fmt.elem.max_normal:g})"


def _block(fmt: QFormat) -> str:
    if fmt.family is Family.SCALED and fmt.granularity.value != "per_group":
        return fmt.granularity.value
    return str(fmt.block_size)


def _table() -> str:
    rows = [("name", "element", "block", "scale", "profiles (default first)")]
    for name, fmt in FORMATS.items():
        profiles = [fmt.profile.value] + [p for p in _profiles(name) if p != fmt.profile.value]
        rows.append((name, _element(fmt), _block(fmt), _SCALE[fmt.family], ", ".join(profiles)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _describe(fmt: QFormat) -> str:
    extra = f" | scale_mode {fmt.scale_mode.value}" if fmt.family is Family.MX else ""
    rounding = "" if fmt.family is Family.NF4 else f" | rounding {fmt.rounding.value}"
    return (f"{fmt.name}: element {_element(fmt)} | block {_block(fmt)} | scale {_SCALE[fmt.family]} | "
            f"profile {fmt.profile.value}{extra}{rounding}")


def _value_grid(fmt: QFormat) -> list[float]:
    """Sorted distinct non-negative finite element values of the format's grid (before scaling)."""
    elem = fmt.elem
    if isinstance(elem, FloatSpec):
        table = float_code_table(elem)
        values = table[torch.isfinite(table) & (table >= 0)]
    elif isinstance(elem, IntSpec):
        values = torch.arange(0, elem.qmax + 1, dtype=torch.float64) * elem.step
    else:
        values = torch.tensor([v for v in NF4_LEVELS if v >= 0])
    return sorted({float(v) for v in values})


def _sample(shape: tuple[int, ...], dist: str, seed: int) -> torch.Tensor:
    """fp32 sample: N(0, 1), U[-1, 1), or N(0, 1) with 1% of entries times 10^U(2, 4)."""
    g = torch.Generator().manual_seed(seed)
    if dist == "uniform":
        return torch.rand(shape, generator=g) * 2 - 1
    x = torch.randn(shape, generator=g)
    if dist == "outliers":
        mask = torch.rand(shape, generator=g) < 0.01
        x = torch.where(mask, x * 10.0 ** (2 + 2 * torch.rand(shape, generator=g)), x)
    return x
