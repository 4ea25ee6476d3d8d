"""GSM8K loaders on the shipped sample files, verl parquet round trip and layout, JSONL, and the `datasets` path.

Run: python -m pytest tests/data/test_gsm8k_loaders.py -q
Nothing downloads: the `datasets` test loads a local folder written in the test.
"""

import json

import pyarrow.parquet as pq
import pytest

from quarl.data.gsm8k import (VERL_GSM8K_INSTRUCTION, extract_ground_truth, load_hf_gsm8k, load_problems, read_jsonl,
                              read_verl_parquet, sample_path, to_verl_rows, write_jsonl, write_verl_parquet)
from quarl.data.records import Problem
from quarl.eval.gsm8k import is_correct

SAMPLE_TRUTHS = ["6", "3750", "26.50", "-7", "14", "45", "10", "150"]


@pytest.mark.parametrize("answer,gt", [
    ("x = 3\n#### 72", "72"), ("#### 1,234,567", "1234567"), ("#### -4", "-4"), ("#### 2.5", "2.5"),
    ("#### 3\n#### 4", "3"),  # verl preprocessing takes the FIRST match (re.search)
])
def test_extract_ground_truth(answer, gt):
    assert extract_ground_truth(answer) == gt


def test_extract_ground_truth_requires_marker():
    with pytest.raises(ValueError, match="####"):
        extract_ground_truth("the answer is 4")


def test_shipped_samples_load_and_agree():
    from_jsonl = read_jsonl(sample_path("jsonl"))
    from_parquet = read_verl_parquet(sample_path("parquet"))
    assert [p.ground_truth for p in from_jsonl] == [p.ground_truth for p in from_parquet] == SAMPLE_TRUTHS
    assert [p.question for p in from_jsonl] == [p.question for p in from_parquet]
    assert [p.answer for p in from_jsonl] == [p.answer for p in from_parquet]
    assert all(p.data_source == "openai/gsm8k" for p in from_jsonl + from_parquet)
    assert all(is_correct(p.answer, p.ground_truth) for p in from_jsonl)  # references score 1 under verl strict


def test_verl_layout_matches_preprocess_script():
    row = pq.read_table(sample_path("parquet")).to_pylist()[3]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["ability"] == "math" and row["reward_model"] == {"style": "rule", "ground_truth": "-7"}
    assert row["prompt"] == [{"role": "user", "content": row["extra_info"]["question"] + " " + VERL_GSM8K_INSTRUCTION}]
    assert row["extra_info"]["split"] == "test" and row["extra_info"]["index"] == 3


def test_verl_parquet_round_trip(tmp_path):
    problems = [Problem(f"How many {i}?", f"{i} + 1 = {i + 1}\n#### {i + 1}", str(i + 1), "openai/gsm8k",
                        f"train-{i}", {"split": "train", "index": i}) for i in range(5)]
    write_verl_parquet(problems, tmp_path / "train.parquet", split="train")
    assert read_verl_parquet(tmp_path / "train.parquet") == problems
    # and back out again: rows identical to the first write
    write_verl_parquet(read_verl_parquet(tmp_path / "train.parquet"), tmp_path / "again.parquet", split="train")
    assert pq.read_table(tmp_path / "again.parquet").to_pylist() == to_verl_rows(problems, "train")


def test_verl_parquet_without_extra_info(tmp_path):
    import pyarrow as pa

    rows = [{"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "Q1? " + VERL_GSM8K_INSTRUCTION}],
             "reward_model": {"style": "rule", "ground_truth": "9"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bare.parquet")
    (p,) = read_verl_parquet(tmp_path / "bare.parquet")
    assert (p.question, p.answer, p.ground_truth, p.id) == ("Q1?", "", "9", "bare-0")


def test_jsonl_round_trip_and_errors(tmp_path):
    problems = read_jsonl(sample_path("jsonl"))
    write_jsonl(problems, tmp_path / "p.jsonl")
    assert read_jsonl(tmp_path / "p.jsonl") == problems
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="'answer'"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_load_problems_dispatch_and_n():
    assert len(load_problems(sample_path("jsonl"), n=3)) == 3
    assert [p.ground_truth for p in load_problems(sample_path("parquet"))] == SAMPLE_TRUTHS


def test_hf_loader_on_local_dataset_folder(tmp_path):
    import pyarrow as pa

    raw = [json.loads(line) for line in sample_path("jsonl").read_text().splitlines()]
    folder = tmp_path / "gsm8k"
    (folder / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(raw), folder / "main" / "test-00000-of-00001.parquet")  # hub layout
    problems = load_hf_gsm8k(str(folder), split="test")
    assert [p.ground_truth for p in problems] == SAMPLE_TRUTHS
    assert problems[0].id == "test-0" and problems[0].data_source == "openai/gsm8k"
