"""quarl.formats.error_stats: relative error, SQNR and max abs error (plus its doctest).

Run: python -m pytest tests/formats/test_stats.py -q
"""

import doctest
import math

import torch

import quarl.formats.stats
from quarl.formats import error_stats


def test_error_stats_hand_computed():
    x = torch.tensor([3.0, 4.0])  # ||x||^2 = 25
    y = torch.tensor([3.0, 3.0])  # error (0, -1): ||e||^2 = 1
    rel, sqnr, max_abs = error_stats(x, y)
    assert rel == 0.2  # sqrt(1 / 25)
    assert math.isclose(sqnr, 10 * math.log10(25.0), abs_tol=1e-12)  # 13.979 dB; float64 log rounding only
    assert max_abs == 1.0


def test_error_stats_edge_cases_and_doctest():
    assert error_stats(torch.zeros(3), torch.zeros(3)) == (0.0, math.inf, 0.0)
    assert error_stats(torch.empty(0), torch.empty(0)) == (0.0, math.inf, 0.0)
    assert doctest.testmod(quarl.formats.stats).failed == 0
