"""One Markdown table renderer for every table quarl writes (testbed report, ``quarl demo``, ``quarl table``).

A leaf module: it imports nothing from quarl, so every package may use it.

    >>> print(render_table(["variant", "accuracy"], [["fp32", "73.4%"], ["a|b", "70.0%"]]))
    | variant | accuracy |
    |---|---|
    | fp32 | 73.4% |
    | a\\|b | 70.0% |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def render_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: one header line, the ``|---|`` rule, one line per row (no trailing newline).

    Args:
        header: column titles.
        rows: one sequence of cell strings per row, each as long as ``header``.

    A ``|`` inside a cell is escaped (``\\|``) so it cannot split the cell. A row of the wrong length raises
    ``ValueError`` naming the row: a short row would silently shift every following cell into the wrong column.
    """
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"table row {i} has {len(row)} cells, the header has {len(header)}: {list(row)!r}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")
