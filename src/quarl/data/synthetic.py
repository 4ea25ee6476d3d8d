"""quarl's synthetic multi-step arithmetic word problems in GSM8K format (the embedded testbed's task).

What: a seeded generator of short stories ("Mia has 14 apples. Mia buys 7 more apples. ... How many apples does
Mia have now?") whose reference solution is one chain-of-thought line per step ("Mia buys 7 more apples, so Mia has
14 + 7 = 21 apples.") followed by GSM8K's final line ``#### N``. Each problem has 1..K steps drawn from
``+ - * /``; every intermediate value is a positive integer (subtraction never goes to zero or below, division is
only chosen when it is exact), so the ground truth is always an integer as in GSM8K.

Why: the embedded testbed model (``quarl.models.testbed``) must be trainable from scratch on 2 CPU cores in minutes
yet behave like a real reasoning model under quantization: an answer is only right when every intermediate
product is right, so accuracy falls with the number of steps and with the precision of the arithmetic - the place
where 4-bit error bites (W4A4 errors concentrate on the longest chains).

Difficulty and vocabulary are controlled by :class:`SyntheticConfig` (steps, operand sizes, allowed operations,
how many names and items the stories draw from).

Held-out splits never overlap training: a problem's split is a pure function of its question text
(``sha256(question) mod 1000 < 1000 * test_fraction`` -> test), so the same question can never appear in two splits,
whatever the seed or the number of problems drawn. The generator draws candidates from one seeded stream and keeps
those that hash into the requested split; test problems are additionally de-duplicated.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import random
from collections.abc import Iterator

from quarl.data.records import Problem

DATA_SOURCE = "quarl/synthetic"

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben", "Eva", "Tom", "Lily", "Noah", "Ella", "Omar",
         "Rosa", "Finn", "Nina", "Hugo", "Cleo", "Ravi", "Maya", "Jack", "Sara", "Yuki")
ITEMS = ("apples", "books", "coins", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards",
         "eggs", "flowers", "toys", "beads", "candles", "buttons", "rocks", "plums", "ribbons", "cups")


class Split(enum.Enum):
    """Which side of the hash split a problem falls on."""

    TRAIN = "train"  # sha256(question) % 1000 >= 1000 * test_fraction
    TEST = "test"  # sha256(question) % 1000 < 1000 * test_fraction


class Op(enum.Enum):
    """One arithmetic step; the value is the symbol written in the chain of thought."""

    ADD = "+"  # v' = v + x,   1 <= x <= max_operand
    SUB = "-"  # v' = v - x,   1 <= x < v
    MUL = "*"  # v' = v * x,   2 <= x <= max_factor, v' <= max_value
    DIV = "/"  # v' = v / x,   2 <= x <= max_factor, x divides v


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty and vocabulary of the synthetic task."""

    min_steps: int = 1  # fewest operations per problem
    max_steps: int = 3  # most operations per problem (K)
    max_start: int = 30  # starting amount drawn from [2, max_start]
    max_operand: int = 30  # addends/subtrahends drawn from [1, max_operand]
    max_factor: int = 5  # multipliers/divisors drawn from [2, max_factor]
    max_value: int = 300  # no intermediate value exceeds this
    ops: tuple[str, ...] = ("+", "-", "*", "/")  # allowed operations (Op values)
    n_names: int = 12  # stories use the first n_names of NAMES
    n_items: int = 12  # ... and the first n_items of ITEMS
    test_fraction: float = 0.1  # share of the question space reserved for the held-out split

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        bad = [o for o in self.ops if o not in {op.value for op in Op}]
        if bad or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of + - * /, got {self.ops}")
        if not 1 <= self.n_names <= len(NAMES) or not 1 <= self.n_items <= len(ITEMS):
            raise ValueError(f"n_names in [1, {len(NAMES)}] and n_items in [1, {len(ITEMS)}] required")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_start < 2 or self.max_operand < 1 or self.max_factor < 2 or self.max_value < self.max_start:
            raise ValueError("need max_start >= 2, max_operand >= 1, max_factor >= 2, max_value >= max_start")


# (question sentence, solution clause) templates per operation; {n} name, {x} operand, {i} item.
_TEMPLATES = {
    Op.ADD: (("{n} buys {x} more {i}.", "{n} buys {x} more"),
             ("{n} finds {x} more {i}.", "{n} finds {x} more")),
    Op.SUB: (("{n} gives away {x} {i}.", "{n} gives away {x}"),
             ("{n} loses {x} {i}.", "{n} loses {x}")),
    Op.MUL: (("{n} then has {x} times as many {i}.", "{n} gets {x} times as many"),),
    Op.DIV: (("{n} splits the {i} into {x} equal groups and keeps one group.", "{n} keeps one of {x} groups"),),
}


def split_of(question: str, test_fraction: float) -> Split:
    """The split a question belongs to: a pure function of its text, so splits can never overlap."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 1000
    return Split.TEST if bucket < round(1000 * test_fraction) else Split.TRAIN


def _apply(op: Op, v: int, x: int) -> int:
    return {Op.ADD: v + x, Op.SUB: v - x, Op.MUL: v * x, Op.DIV: v // x}[op]


def _draw_step(rng: random.Random, cfg: SyntheticConfig, v: int) -> tuple[Op, int]:
    """Pick an allowed operation and operand that keep v a positive integer <= max_value."""
    for _ in range(100):
        op = Op(rng.choice(cfg.ops))
        if op is Op.ADD:
            x = rng.randint(1, cfg.max_operand)
        elif op is Op.SUB:
            x = rng.randint(1, min(cfg.max_operand, v - 1)) if v > 1 else 0
        else:
            x = rng.randint(2, cfg.max_factor)
        if x >= 1 and (op is Op.SUB or (op is Op.DIV and v % x == 0) or (
                op in (Op.ADD, Op.MUL) and _apply(op, v, x) <= cfg.max_value)):
            return op, x
    return Op.ADD, 1  # unreachable in practice: + with x=1 is always valid when max_value allows it


def make_problem(rng: random.Random, cfg: SyntheticConfig) -> tuple[str, str, int, int]:
    """Draw one problem: (question, solution ending '#### N', answer N, number of steps)."""
    name = rng.choice(NAMES[: cfg.n_names])
    item = rng.choice(ITEMS[: cfg.n_items])
    steps = rng.randint(cfg.min_steps, cfg.max_steps)
    v = rng.randint(2, cfg.max_start)
    sentences = [f"{name} has {v} {item}."]
    lines = []
    for _ in range(steps):
        op, x = _draw_step(rng, cfg, v)
        q_tpl, s_tpl = rng.choice(_TEMPLATES[op])
        new = _apply(op, v, x)
        sentences.append(q_tpl.format(n=name, x=x, i=item))
        clause = s_tpl.format(n=name, x=x, i=item)
        lines.append(f"{clause}, so {name} has {v} {op.value} {x} = {new} {item}.")
        v = new
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    solution = "\n".join(lines + [f"#### {v}"])
    return question, solution, v, steps


def generate(cfg: SyntheticConfig, n: int, split: Split, seed: int = 0) -> list[Problem]:
    """Generate ``n`` problems of one split, deterministically from ``seed``.

    Args:
        cfg: difficulty and vocabulary.
        n: number of problems to return.
        split: ``Split.TRAIN`` or ``Split.TEST``; membership is decided by the question hash (see module docstring).
        seed: seed of the candidate stream; the same (cfg, n, split, seed) always gives the same list.

    Returns:
        ``n`` :class:`Problem` records with ``data_source="quarl/synthetic"`` and ``meta`` holding the split, the
        number of steps and the seed. Test problems are unique; training problems may repeat.
    """
    return list(_iterate(cfg, n, split, seed))


def _iterate(cfg: SyntheticConfig, n: int, split: Split, seed: int) -> Iterator[Problem]:
    rng = random.Random(f"quarl-synthetic-{seed}")
    seen: set[str] = set()
    count, tries, max_tries = 0, 0, 1000 * max(n, 1)
    while count < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"could not draw {n} distinct {split.value} problems; widen the config")
        question, solution, value, steps = make_problem(rng, cfg)
        if split_of(question, cfg.test_fraction) is not split:
            continue
        if split is Split.TEST and question in seen:
            continue
        seen.add(question)
        yield Problem(question=question, answer=solution, ground_truth=str(value), data_source=DATA_SOURCE,
                      id=f"{split.value}-{seed}-{count}", meta={"split": split.value, "num_steps": steps, "seed": seed})
        count += 1
