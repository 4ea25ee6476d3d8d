"""Shared adversarial tensor generators for the `quarl.formats` cross-checks and property tests.

Not a test module (leading underscore): `test_xcheck_*.py` and `test_properties.py` import it. Every generator is
deterministic (seeded `torch.Generator`), returns a float32 tensor of shape `(rows, cols)` with `cols` a multiple of 32
(so it blocks evenly for MX block 32, NVFP4 block 16 and NVFP4 2-D 16x16 when `rows` is a multiple of 16), and targets
one numerical edge where the references differ (docs/formats.md):

- `normal`, `uniform`: plain random data (SQNR-style regime).
- `outliers`: normal data with a few entries scaled by 1e2..1e4, so block amax and tensor amax differ by decades and
  small blocks see the E4M3 scale floor (docs/formats.md difference 6).
- `grid_ties`: per block, a power-of-two scale 2^k times {the element grid, the midpoints between grid neighbours};
  the block amax is `elem_max * 2^k`, so under FLOOR/RCEIL/NVFP4-with-pow2-global the scaled values are *exact* ties
  (docs/formats.md difference 1). `nv_ties` does the same for NVFP4 (power-of-two tensor and block scales).
- `pow2_neighbours`: 2^k and nextafter(2^k, ±inf) for k across the fp32 range, and block maxima at the scale-mode
  boundaries `{6, 7, 7.5, 8, 28, 448, 470, 480, 57344} * 2^k` and their neighbours (docs/formats.md
  differences 2, 3, 9).
- `tiny`: fp32 subnormal and near-subnormal magnitudes, amax down to 2^-149 (hand check `mx_fp32_denormal_range`).
- `huge`: magnitudes up to 3.39e38 (bf16 max; scale-exponent clamp at +127).
- `zero_blocks`: normal data with whole blocks set to +0.0 or -0.0 (docs/formats.md differences 7, 10).
- `all_zero`: the all-zero tensor with mixed signed zeros (`nv_all_zero_tensor`).

`as_dtype` casts to bf16/fp16 (values that bf16/fp16 cannot hold round or overflow; that is the point: it is what a
bf16 model weight would be). `nonfinite` injects NaN/±Inf for policy tests.

Run: imported by `pytest tests/formats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch

# Positive element grids (E2M1, E2M3, E3M2, E4M3, E5M2): used for ties and for the `quarl formats --sample` grid check.
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def float_grid(ebits: int, mbits: int, max_normal: float) -> list[float]:
    """All non-negative finite values of a small OCP float format (bias 2^(ebits-1)-1, subnormals, no Inf).

    Args:
        ebits: exponent bits.
        mbits: explicit mantissa bits.
        max_normal: largest finite value (cuts off NaN/Inf encodings, e.g. 448 for E4M3, 57344 for E5M2).

    Returns:
        The sorted grid, starting at 0.0.
    """
    bias = 2 ** (ebits - 1) - 1
    out = set()
    for e in range(2**ebits):
        for m in range(2**mbits):
            if e == 0:
                v = (m / 2**mbits) * 2.0 ** (1 - bias)
            else:
                v = (1 + m / 2**mbits) * 2.0 ** (e - bias)
            if v <= max_normal:
                out.add(v)
    return sorted(out)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Standard normal data."""
    return torch.randn(rows, cols, generator=_gen(seed))


def uniform(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Uniform data in [-1, 1)."""
    return torch.rand(rows, cols, generator=_gen(seed)) * 2 - 1


def outliers(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Normal data with ~1% of entries multiplied by 10^U(2, 4) (heavy-tailed, per-block amax spread)."""
    g = _gen(seed)
    x = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < 0.01
    mask[0, 0] = True  # at least one outlier, whatever the seed
    boost = 10.0 ** (2 + 2 * torch.rand(rows, cols, generator=g))
    return torch.where(mask, x * boost, x)


def grid_ties(
    grid: tuple[float, ...] | list[float] = E2M1_GRID,
    rows: int = 32,
    cols: int = 128,
    block: int = 32,
    k_range: tuple[int, int] = (-20, 20),
    seed: int = 0,
) -> torch.Tensor:
    """Blocks of `2^k * v` with v the grid values and the midpoints between neighbours (exact ties).

    Element 0 of each block is `±max(grid) * 2^k`, so the block amax is exactly the element max times a power of two:
    FLOOR/CEIL/EVEN/RCEIL then all pick scale 2^k (for E2M1: 6 = 1.5*2^2, FLOOR exponent 2 - 2 = 0) and `x / 2^k`
    lands exactly on grid values and midpoints. Signs are random.

    Args:
        grid: positive element grid, ascending, starting at 0.
        rows, cols: output shape; `cols % block == 0`.
        block: block length (32 for MX, 16 for NVFP4).
        k_range: inclusive range of the per-block exponent k.
        seed: RNG seed.
    """
    g = _gen(seed)
    grid_t = torch.tensor(grid, dtype=torch.float64)
    mids = (grid_t[1:] + grid_t[:-1]) / 2
    pool = torch.cat([grid_t, mids])  # every value is exact in fp32 for the small formats
    nblk = rows * cols // block
    idx = torch.randint(0, pool.numel(), (nblk, block), generator=g)
    vals = pool[idx]
    vals[:, 0] = grid_t[-1]
    k = torch.randint(k_range[0], k_range[1] + 1, (nblk, 1), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(nblk, block, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (vals * sign * torch.exp2(k)).to(torch.float32).reshape(rows, cols)


def nv_ties(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """NVFP4 exact ties: tensor amax `2688 * 2^j`, block amaxes `6 * 2^(j+m)`, elements `2^(j+m) * {grid, mids}`.

    With a power-of-two per-tensor scale (pts = amax/2688 = 2^j) and E4M3 block scales that are powers of two
    (s8 = 2^m, m in [-6, 8]), every reference's scaled value `x * (1/pts) / s8` (torchao, TE) or `x / (s8/gs)` (CT)
    is exact, so the E2M1 midpoints stay exact ties. Block 0 holds the tensor amax itself.
    """
    g = _gen(seed)
    j = int(torch.randint(-10, 11, (1,), generator=g))
    nblk = rows * cols // 16
    grid_t = torch.tensor(E2M1_GRID, dtype=torch.float64)
    pool = torch.cat([grid_t, (grid_t[1:] + grid_t[:-1]) / 2])
    vals = pool[torch.randint(0, pool.numel(), (nblk, 16), generator=g)]
    vals[:, 0] = 6.0
    m = torch.randint(-6, 9, (nblk, 1), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(nblk, 16, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = vals * sign * torch.exp2(m + j)
    x[0, 0] = 2688.0 * 2.0**j
    return x.to(torch.float32).reshape(rows, cols)


_BOUNDARY_MAXIMA = (1.0, 1.5, 1.75, 6.0, 7.0, 7.5, 8.0, 28.0, 448.0, 470.0, 480.0, 57344.0)


def pow2_neighbours(rows: int = 32, cols: int = 128, seed: int = 0, block: int = 32) -> torch.Tensor:
    """Powers of two, boundary block maxima times powers of two, and their fp32 neighbours (nextafter ±).

    Per `block`: a centre exponent c in [-100, 100]; elements are 2^(c+U{-8..0}) or a nextafter neighbour. In about
    half the blocks element 0 is replaced by a boundary maximum `m * 2^c` (m from `_BOUNDARY_MAXIMA`) or one of its
    neighbours, so the scale-exponent decision itself sits on a boundary (the other elements stay below it).
    """
    g = _gen(seed)
    nblk = rows * cols // block
    c = torch.randint(-100, 100, (nblk, 1), generator=g).to(torch.float32)
    k = c + torch.randint(-8, 1, (nblk, block), generator=g).to(torch.float32)
    vals = _neighbour(torch.exp2(k), torch.randint(0, 3, (nblk, block), generator=g))
    maxima = torch.tensor(_BOUNDARY_MAXIMA)[torch.randint(0, len(_BOUNDARY_MAXIMA), (nblk,), generator=g)]
    bmax = _neighbour(maxima * torch.exp2(c[:, 0]), torch.randint(0, 3, (nblk,), generator=g))
    use = torch.rand(nblk, generator=g) < 0.5
    vals[:, 0] = torch.where(use, bmax, vals[:, 0])
    sign = torch.where(torch.rand(nblk, block, generator=g) < 0.5, -1.0, 1.0)
    return (vals * sign).reshape(rows, cols)


def _neighbour(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """x itself (which == 0), nextafter(x, +inf) (1) or nextafter(x, 0) (2)."""
    up = torch.nextafter(x, torch.full_like(x, float("inf")))
    down = torch.nextafter(x, torch.zeros_like(x))
    return torch.where(which == 1, up, torch.where(which == 2, down, x))


def tiny(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Magnitudes 2^U(-149, -110): fp32 subnormals and the smallest normals, including single-subnormal blocks."""
    g = _gen(seed)
    e = -149 + 39 * torch.rand(rows, cols, generator=g)
    x = torch.exp2(e) * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    x[0, :16] = 0.0
    x[0, 3] = 2.0**-149  # a block whose amax is the smallest subnormal
    x[1, :32] = 1.5 * 2.0**-125  # docs/formats.md hand check `mx_fp32_denormal_range` block
    return x


def huge(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """Magnitudes 2^U(100, 128) up to bf16 max = (2 - 2^-7) * 2^127 (finite in fp32 and bf16; fp16 overflows)."""
    g = _gen(seed)
    top = torch.finfo(torch.bfloat16).max
    e = 100 + 28 * torch.rand(rows, cols, generator=g)
    x = torch.exp2(e).clamp(max=top)
    x[0, 0] = top
    return x * torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)


def zero_blocks(rows: int = 32, cols: int = 128, seed: int = 0, block: int = 16) -> torch.Tensor:
    """Normal data with ~1/3 of the `block`-long blocks set to +0.0 and ~1/6 to -0.0."""
    g = _gen(seed)
    x = torch.randn(rows, cols, generator=g)
    r = torch.rand(rows, cols // block, generator=g)
    r = torch.repeat_interleave(r, block, dim=1)
    x = torch.where(r < 1 / 3, torch.zeros_like(x), x)
    return torch.where((r >= 1 / 3) & (r < 0.5), torch.full_like(x, -0.0), x)


def all_zero(rows: int = 32, cols: int = 128, seed: int = 0) -> torch.Tensor:
    """All zeros, with a random half of them negative zero."""
    sign = torch.rand(rows, cols, generator=_gen(seed)) < 0.5
    return torch.where(sign, torch.full((rows, cols), -0.0), torch.zeros(rows, cols))


def nonfinite(x: torch.Tensor, seed: int = 0, frac: float = 0.02) -> torch.Tensor:
    """Copy of `x` with a fraction of entries replaced by NaN, +Inf or -Inf."""
    g = _gen(seed)
    r = torch.rand(x.shape, generator=g)
    pick = torch.randint(0, 3, x.shape, generator=g)
    special = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=x.dtype)[pick]
    return torch.where(r < frac, special, x)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`: the bf16/fp16 view of an adversarial tensor (overflow to Inf in fp16 is intended)."""
    return x.to(dtype)


# Name -> generator(rows, cols, seed): the finite adversarial families, for pytest parametrization.
FINITE: dict[str, Callable[..., torch.Tensor]] = {
    "normal": normal,
    "uniform": uniform,
    "outliers": outliers,
    "grid_ties": lambda rows=32, cols=128, seed=0: grid_ties(rows=rows, cols=cols, seed=seed),
    "nv_ties": nv_ties,
    "pow2_neighbours": pow2_neighbours,
    "tiny": tiny,
    "huge": huge,
    "zero_blocks": zero_blocks,
    "all_zero": all_zero,
}


def sweep(fast: Iterable[str], fast_bf16: Iterable[str] = ("normal",), prefix: tuple = ()) -> list:
    """pytest params `(*prefix, family, dtype)` over every FINITE family in fp32 and bf16.

    Families in `fast` (fp32) and `fast_bf16` (bf16) run by default; every other combination is marked `slow`
    (run with `-m slow`), so the default suite stays fast while the full adversarial sweep stays one flag away.
    """
    fast, fast_bf16 = set(fast), set(fast_bf16)
    params = []
    for dtype, chosen in ((torch.float32, fast), (torch.bfloat16, fast_bf16)):
        for family in sorted(FINITE):
            marks = () if family in chosen else (pytest.mark.slow,)
            ident = "-".join([*(str(getattr(p, "value", p)) for p in prefix), family, str(dtype).split(".")[-1]])
            params.append(pytest.param(*prefix, family, dtype, marks=marks, id=ident))
    return params
