"""Named data sources for `quarl eval --data`.

Run: python -m pytest tests/data/test_sources.py -q
"""

import pytest

from quarl.data.gsm8k import sample_path
from quarl.data.sources import load_source
from quarl.data.synthetic import Split, SyntheticConfig, generate


def test_named_and_path_sources():
    assert load_source("synthetic", 5) == generate(SyntheticConfig(), 5, Split.TEST, seed=1234)
    assert load_source("synthetic", 5, seed=7) == generate(SyntheticConfig(), 5, Split.TEST, seed=7)
    rg = load_source("gsm_symbolic", 3)
    assert len(rg) == 3 and rg[0].data_source == "reasoning_gym/gsm_symbolic"
    assert len(load_source(str(sample_path("jsonl")), 4)) == 4
    assert len(load_source(str(sample_path("parquet")))) == 8


def test_generators_need_n():
    with pytest.raises(ValueError, match="number of problems"):
        load_source("synthetic")
