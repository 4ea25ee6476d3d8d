"""`quarl demo --quick` runs offline end to end on the shipped testbed and writes its run directory.

The training demo (`quarl demo`) is tested in tests/runs/test_cli_demo_train.py.

Run: python -m pytest tests/cli/test_cli_demo.py -q
"""

import json

from quarl.cli import main


def test_quick_demo_writes_table_and_diagnosis(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--n", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("unquantized (fp32)", "MXFP4 W4A16", "MXFP4 W4A4", "NVFP4 W4A16", "NVFP4 W4A4"):
        assert f"| {row} |" in text
    assert "0 without gradient" in text  # the STE keeps gradients flowing through W4A4
    table = (out / "accuracy.md").read_text()
    assert "8 held-out synthetic problems" in table
    report = json.loads((out / "diagnose.json").read_text())
    assert report["spec"]["error_type"] == "mxfp4" and report["spec"]["injection_point"] == "both"
    assert (out / "diagnose.png").stat().st_size > 0


def test_demo_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    assert main(["demo", "--n", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
