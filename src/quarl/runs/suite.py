"""Suites: a base train config, named cells (overrides, optionally a grid), seeds, and declared expectations.

Why: a hand-kept results table compares single seeds and judges by eye whether a
variant "recovered". A suite declares, before anything runs, what each cell is expected to do
(``final - step0 >= 3``: recovers at least 3 points; ``final - step0 <= 1``: a control that must not), and the verdict
is computed from the seeds' 95% confidence interval of that quantity (points, 0-100):

    relation  PASSED           FAILED           otherwise
    >= c      ci_low >= c      ci_high < c      INCONCLUSIVE
    <= c      ci_high <= c     ci_low > c       INCONCLUSIVE

and a cell whose declared seeds have not all finished is INCONCLUSIVE whatever its interval.

Format (strict: an unknown key is an error naming the nearest valid key)::

    # quarl suite suites/example.yaml
    name: example                     # [A-Za-z0-9_.-]+
    description: what the study asks
    base: train.yaml                  # a train config path (relative to this file) or an inline mapping
    seeds: [0, 1, 2]                  # or a count N (= 0..N-1)
    metric: strict                    # scorer the expectations use: strict | flexible
    grid: {}                          # dotted key -> list of values, crossed with every cell
    expect: []                        # default expectations for cells that declare none
    cells:
      - name: W4A4-mxfp4              # the run name prefix; grid values are appended (W4A4-mxfp4-nvfp4 ...)
        description: MXFP4 W4A4, STE on
        set: {injection.scheme: W4A4, injection.error_type: mxfp4}   # dotted key -> value (null clears a block)
        grid: {aqn.sigma_start: [0.01, 0.001]}                        # crossed with the suite's grid
        expect: "final - step0 >= 3"                                  # or a list of them
        seeds: [0]                                                    # optional: this cell's own seeds

Expectation grammar: ``TERM OP NUMBER`` where TERM is ``final``, ``step0`` or ``final - step0`` (accuracy in points)
and OP is ``>=`` or ``<=``. Overrides reach the trainer as ``key=value`` strings whose value is a YAML scalar.

This module is pure: it parses and expands suites and judges expectations; :mod:`quarl.runs.runner` executes them.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from quarl import configio
from quarl.runs.registry import check_name
from quarl.runs.stats import Estimate

_SUITE_KEYS = ("name", "description", "base", "seeds", "metric", "grid", "expect", "cells")
_CELL_KEYS = ("name", "description", "set", "grid", "expect", "seeds")
_TERMS = ("final - step0", "final", "step0")
NO_EXPECTATION = "no expectation declared"  # the reason of a cell that declares none (its status: its runs')
_EXPECT_RE = re.compile(r"^\s*(final\s*-\s*step0|final|step0)\s*(>=|<=)\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


class Verdict(enum.Enum):
    """A cell's status against its declared expectations."""

    PASSED = "PASSED"  # every expectation holds for the whole 95% interval
    FAILED = "FAILED"  # some expectation is violated by the whole interval
    INCONCLUSIVE = "INCONCLUSIVE"  # the interval straddles a threshold, seeds are missing, or nothing was measured


@dataclasses.dataclass(frozen=True)
class Expectation:
    """``term op threshold``, e.g. final - step0 >= 3 (points)."""

    term: str  # "final - step0" | "final" | "step0"
    op: str  # ">=" | "<="
    threshold: float

    def __str__(self) -> str:
        return f"{self.term} {self.op} {self.threshold:g}"

    def judge(self, est: Estimate) -> Verdict:
        """Verdict of this expectation given the 95% interval of its term."""
        if est.n == 0 or est.ci == "none" or math.isnan(est.lo) or math.isnan(est.hi):
            return Verdict.INCONCLUSIVE  # nothing measured, or a point value without any interval
        if self.op == ">=":
            return Verdict.PASSED if est.lo >= self.threshold else (
                Verdict.FAILED if est.hi < self.threshold else Verdict.INCONCLUSIVE)
        return Verdict.PASSED if est.hi <= self.threshold else (
            Verdict.FAILED if est.lo > self.threshold else Verdict.INCONCLUSIVE)


def parse_expectation(text: str) -> Expectation:
    """Parse ``final - step0 >= 3`` and friends.

    >>> parse_expectation("final-step0 >= 3"), str(parse_expectation(" final <= 1.5"))
    (Expectation(term='final - step0', op='>=', threshold=3.0), 'final <= 1.5')
    """
    m = _EXPECT_RE.match(str(text))
    if not m:
        raise ValueError(f"bad expectation {text!r}: write TERM OP NUMBER with TERM one of {', '.join(_TERMS)} and "
                         f"OP >= or <= (points), e.g. 'final - step0 >= 3'")
    term = "final - step0" if "-" in m.group(1) else m.group(1)
    return Expectation(term, m.group(2), float(m.group(3)))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One experiment of a suite: its run name, overrides of the base config, and expectations."""

    name: str
    description: str
    overrides: tuple[str, ...]  # "dotted.key=value" (YAML scalar), applied in order
    expect: tuple[Expectation, ...]
    seeds: tuple[int, ...] | None = None  # the cell's own seeds (None: the suite's)


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    description: str
    base: dict | Path  # an inline config mapping or a config file path
    seeds: tuple[int, ...]
    metric: str  # strict | flexible
    cells: tuple[Cell, ...]
    path: Path | None = None  # the suite file, when loaded from one

    def with_seeds(self, n: int) -> Suite:
        """The first ``n`` declared seeds (the suite's and each cell's own), extended with the following integers."""
        if n < 1:
            raise ValueError(f"--seeds must be >= 1, got {n}")

        def first(declared: tuple[int, ...]) -> tuple[int, ...]:
            seeds = list(declared[:n])
            while len(seeds) < n:
                seeds.append(max(seeds, default=-1) + 1)
            return tuple(seeds)

        cells = tuple(c if c.seeds is None else dataclasses.replace(c, seeds=first(c.seeds)) for c in self.cells)
        return dataclasses.replace(self, seeds=first(self.seeds), cells=cells)

    def seeds_of(self, cell: Cell) -> tuple[int, ...]:
        """The seeds a cell runs: its own, or the suite's."""
        return self.seeds if cell.seeds is None else cell.seeds

    def runs(self) -> list[tuple[str, tuple[str, ...], int]]:
        """Every (run name, overrides, seed): cells in declared order, seeds innermost."""
        return [(c.name, c.overrides + (f"run.seed={s}", f"run.name={c.name}"), s) for c in self.cells
                for s in self.seeds_of(c)]

    def cell(self, name: str) -> Cell:
        for c in self.cells:
            if c.name == name:
                return c
        raise KeyError(f"no cell {name!r} in suite {self.name!r}; cells: {', '.join(c.name for c in self.cells)}")


def yaml_scalar(value: Any) -> str:
    """A YAML text that ``yaml.safe_load`` reads back as ``value`` (PyYAML reads ``1e-05`` as a string; fix that).

    >>> yaml_scalar(1e-05), yaml_scalar(None), yaml_scalar("mxfp4"), yaml_scalar(False), yaml_scalar([1, "a"])
    ('1.0e-05', 'null', 'mxfp4', 'false', '[1, a]')
    """
    if isinstance(value, float) and math.isfinite(value):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mant, exp = text.split("e")
            text = f"{mant}.0e{exp}"
    elif isinstance(value, (str, bool, int, type(None), list, tuple, dict)):
        text = yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True,
                              width=10_000).strip()
        text = text.removesuffix("\n...").strip()
    else:
        raise ValueError(f"cannot express {value!r} ({type(value).__name__}) as a YAML override value")
    if yaml.safe_load(text) != (list(value) if isinstance(value, tuple) else value):
        raise ValueError(f"{value!r} does not survive a YAML round trip as an override ({text!r})")
    return text


def _value_slug(value: Any) -> str:
    text = {None: "none", True: "on", False: "off"}.get(value, None) if isinstance(value, (bool, type(None))) else None
    text = text if text is not None else (f"{value:g}" if isinstance(value, float) else str(value))
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_") or "x"


def _strict_keys(data: Any, valid: tuple[str, ...], where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in valid:
            raise configio.unknown_key_error(str(key), valid, where)
    return data


def _dotted_mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and k for k in data):
        raise ValueError(f"{where}: expected a mapping of dotted config keys (e.g. injection.use_ste: false)")
    return data


def _expectations(data: Any, where: str) -> tuple[Expectation, ...]:
    items = [] if data is None else [data] if isinstance(data, str) else data
    if not isinstance(items, list):
        raise ValueError(f"{where}: expect is a string or a list of strings")
    return tuple(parse_expectation(e) for e in items)


def _seeds(data: Any, where: str = "seeds") -> tuple[int, ...]:
    if isinstance(data, int) and not isinstance(data, bool):
        if data < 1:
            raise ValueError(f"{where}: a count must be >= 1, got {data}")
        return tuple(range(data))
    if isinstance(data, list) and data and all(isinstance(s, int) and not isinstance(s, bool) for s in data):
        if len(set(data)) != len(data):
            raise ValueError(f"{where}: duplicates in {data}")
        return tuple(data)
    raise ValueError(f"{where}: a count or a non-empty list of ints, got {data!r}")


def _expand_cell(raw: dict, suite_grid: dict, default_expect: tuple, index: int) -> list[Cell]:
    where = f"cells[{index}]"
    raw = _strict_keys(raw, _CELL_KEYS, where)
    if "name" not in raw:
        raise ValueError(f"{where}: every cell needs a name (it becomes the run name)")
    name = check_name(str(raw["name"]))
    sets = _dotted_mapping(raw.get("set"), f"{where}.set")
    grid = {**suite_grid, **_dotted_mapping(raw.get("grid"), f"{where}.grid")}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: grid key {key!r} needs a non-empty list of values")
    expect = _expectations(raw.get("expect"), f"{where}.expect") or default_expect
    seeds = _seeds(raw["seeds"], f"{where}.seeds") if raw.get("seeds") is not None else None
    base_over = tuple(f"{k}={yaml_scalar(v)}" for k, v in sets.items())
    keys = list(grid)
    cells = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        suffix = "".join(f"-{_value_slug(v)}" for v in combo)
        extra = tuple(f"{k}={yaml_scalar(v)}" for k, v in zip(keys, combo))
        desc = str(raw.get("description", ""))
        if combo:
            desc = (desc + " " if desc else "") + "(" + ", ".join(f"{k}={v}" for k, v in zip(keys, combo)) + ")"
        cells.append(Cell(check_name(name + suffix), desc, base_over + extra, expect, seeds))
    return cells


def parse_suite(data: Mapping, base_dir: Path | None = None, where: str = "suite") -> Suite:
    """Build a :class:`Suite` from a parsed YAML mapping; ``base_dir`` resolves a relative ``base`` path."""
    data = _strict_keys(dict(data), _SUITE_KEYS, where)
    for key in ("name", "base", "seeds"):
        if key not in data:
            raise ValueError(f"{where}: missing required key {key!r}")
    name = check_name(str(data["name"]))
    base = data["base"]
    if isinstance(base, str):
        path = Path(base)
        base = path if path.is_absolute() or base_dir is None else (base_dir / path)
        if not base.exists():
            raise FileNotFoundError(f"{where}: base config {base} not found")
    elif not isinstance(base, dict):
        raise ValueError(f"{where}: base is a config file path or an inline config mapping")
    metric = data.get("metric", "strict")
    if metric not in ("strict", "flexible"):
        raise configio.unknown_key_error(str(metric), ("strict", "flexible"), f"{where}.metric")
    grid = _dotted_mapping(data.get("grid"), f"{where}.grid")
    default_expect = _expectations(data.get("expect"), f"{where}.expect")
    raw_cells = data.get("cells") or [{"name": name}]
    if not isinstance(raw_cells, list):
        raise ValueError(f"{where}: cells is a list of mappings")
    cells = [c for i, raw in enumerate(raw_cells) for c in _expand_cell(raw, grid, default_expect, i)]
    dup = [n for n, k in _counts(c.name for c in cells).items() if k > 1]
    if dup:
        raise ValueError(f"{where}: duplicate cell names {dup}")
    return Suite(name, str(data.get("description", "")), base, _seeds(data["seeds"]), metric, tuple(cells))


def _counts(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return out


def load_suite(path: str | Path) -> Suite:
    """Load and validate a suite YAML file."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a suite is a mapping, got {type(data).__name__}")
    return dataclasses.replace(parse_suite(data, path.parent, where=str(path)), path=path)


def judge_cell(cell: Cell, estimates: Mapping[str, Estimate], n_finished: int, n_seeds: int) -> tuple[Verdict, str]:
    """A cell's verdict and a one-line reason, from the estimate of each term (``"final - step0"``, ...)."""
    if not cell.expect:
        return Verdict.INCONCLUSIVE, NO_EXPECTATION
    if n_finished < n_seeds:
        return Verdict.INCONCLUSIVE, f"{n_finished}/{n_seeds} seeds finished"
    verdicts = [(e, e.judge(estimates[e.term])) for e in cell.expect]
    for wanted in (Verdict.FAILED, Verdict.INCONCLUSIVE):
        hits = [e for e, v in verdicts if v is wanted]
        if hits:
            return wanted, "; ".join(f"{e} (95% CI {_ci(estimates[e.term])})" for e in hits)
    return Verdict.PASSED, "; ".join(f"{e} (95% CI {_ci(estimates[e.term])})" for e in cell.expect)


def _ci(e: Estimate) -> str:
    return "n/a" if math.isnan(e.lo) else f"[{e.lo:.1f}, {e.hi:.1f}]"

