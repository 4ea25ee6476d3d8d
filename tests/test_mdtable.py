"""The one Markdown table renderer (quarl.mdtable) and the testbed report table built on it.

Run: python -m pytest tests/test_mdtable.py -q
"""

import doctest

import pytest

import quarl.mdtable
from quarl.mdtable import render_table
from quarl.models.build import AccuracyRow, markdown_table


def test_render_table_layout():
    assert render_table(["a", "b"], [["1", "2"], ["3", "4"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"


def test_render_table_escapes_pipes_in_cells_and_header():
    assert render_table(["x|y"], [["p|q"]]).splitlines() == ["| x\\|y |", "|---|", "| p\\|q |"]


def test_render_table_no_rows_is_header_and_rule():
    assert render_table(["a", "b", "c"], []) == "| a | b | c |\n|---|---|---|"


@pytest.mark.parametrize("row", [["only one"], ["1", "2", "3"]])
def test_render_table_rejects_a_row_of_the_wrong_length(row):
    with pytest.raises(ValueError, match=r"table row 1 has \d cells, the header has 2"):
        render_table(["a", "b"], [["ok", "ok"], row])


def test_doctest():
    result = doctest.testmod(quarl.mdtable)
    assert result.attempted == 1 and result.failed == 0


def test_testbed_report_table_renders_through_it():
    rows = [AccuracyRow("unquantized (fp32)", None, 4, 3, 4, {1: (2, 2), 2: (1, 2)}, 1.0),
            AccuracyRow("MXFP4 W4A4", "MXFP4", 4, 1, 3, {1: (1, 2), 2: (0, 2)}, 1.0)]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| variant | accuracy [95% CI] | Δ vs baseline | format compliance | 1-step | 2-step |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2].startswith("| unquantized (fp32) | 75.0% [") and lines[2].endswith(" | — | 100.0% | 100.0% | 50.0% |")
    assert lines[3].startswith("| MXFP4 W4A4 | 25.0% [") and lines[3].endswith(" | -50.0 | 75.0% | 50.0% | 0.0% |")
