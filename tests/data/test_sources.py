"""Named data sources for `quarl eval --data`.

Run: python -m pytest tests/data/test_sources.py -q
"""

import json
import shutil
from pathlib import Path

import pytest

from quarl.data import sources
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


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF offline mode with an empty datasets cache; quarl must not even call datasets for an uncached id."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets reads the variable once, at import
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(sources, "fetch_hf_rows", lambda *a, **k: calls.append(a) or pytest.fail("datasets called"))
    return calls


@pytest.mark.parametrize("name", ["nope", "acme/gsm-like", "gsm8k"])
def test_unavailable_offline_lists_accepted_forms(offline, name):
    with pytest.raises(ValueError) as exc:
        load_source(name)
    msg = str(exc.value)
    assert f"{name!r}" in msg and "offline" in msg and offline == []
    assert all(form in msg for form in ("synthetic", "gsm_symbolic", "gsm8k", ".jsonl", ".parquet", "owner/name"))


def test_bad_paths_and_ids(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for source, reason in [(str(tmp_path / "missing.jsonl"), "no such file"),
                           (str(tmp_path / "notes.txt"), "not .jsonl or .parquet"),
                           ("two words", "not a Hugging Face dataset id")]:
        with pytest.raises(ValueError, match=reason) as exc:
            load_source(source)
        assert "synthetic | gsm_symbolic | gsm8k" in str(exc.value)


def test_online_failure_becomes_the_same_message(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    failure = ConnectionError("Couldn't reach 'nope' on the Hub (LocalEntryNotFoundError)")  # datasets, no network

    def fetch(*args, **kwargs):
        raise failure

    monkeypatch.setattr(sources, "fetch_hf_rows", fetch)
    with pytest.raises(ValueError, match="Couldn't reach 'nope'.*use a named source") as exc:
        load_source("nope")
    assert exc.value.__cause__ is failure


def _hub_style_cache(cache: Path, dataset_id: str) -> None:
    """Put the shipped JSONL sample into ``cache`` where ``datasets`` keeps a hub dataset it has downloaded.

    datasets' offline fallback reads ``<cache>/<owner>___<name>/<config>/<version>/<hash>/`` holding
    ``dataset_info.json`` and ``<name>-<split>.arrow``; a local-folder load writes the same files under the folder's
    name, which is renamed here to what a download of ``dataset_id`` (config ``main``) would have left.
    """
    import datasets

    src = cache.parent / "src"
    src.mkdir()
    shutil.copy(sample_path("jsonl"), src / "test.jsonl")
    datasets.load_dataset(str(src), split="test", cache_dir=str(cache))
    owner, name = dataset_id.split("/")
    root = cache / f"{owner}___{name}"
    (cache / "src").rename(root)
    (root / "default").rename(root / "main")
    [entry] = [p for p in (root / "main").glob("*/*") if p.is_dir()]
    info = json.loads((entry / "dataset_info.json").read_text())
    (entry / "dataset_info.json").write_text(json.dumps(info | {"config_name": "main", "dataset_name": name}))
    (entry / "src-test.arrow").rename(entry / f"{name}-test.arrow")


def test_cached_dataset_loads_offline(monkeypatch, tmp_path):
    import datasets

    _hub_style_cache(tmp_path / "cache", "acme/mini_gsm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert sources._cached("acme/mini_gsm") and not sources._cached("acme/other")
    problems = load_source("acme/mini_gsm", n=3)
    assert [p.ground_truth for p in problems] == [p.ground_truth for p in load_source(str(sample_path("jsonl")), 3)]
