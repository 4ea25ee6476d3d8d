"""Run the doctests of quarl.eval and quarl.data modules (examples in docstrings are tests).

Run: python -m pytest tests/eval/test_doctests.py -q
"""

import doctest
import importlib

import pytest

MODULES = ["quarl.eval.gsm8k", "quarl.eval.metrics", "quarl.data.gsm8k", "quarl.data.reasoning_gym"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
