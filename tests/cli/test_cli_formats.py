"""`quarl formats`: the format table, value grids, sample error statistics and argument errors.

Run: pytest tests/cli/test_cli_formats.py -q
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from quarl.cli import main
from quarl.formats import FORMATS, fake_quantize


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["formats", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_lists_every_format_with_its_columns(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert list(rows) == list(FORMATS)
    assert re.search(r"nvfp4\s+e2m1 \(max 6\)\s+16\s+E4M3 x fp32 tensor\s+compressed_tensors, torchao, "
                     r"transformer_engine", rows["nvfp4"])
    assert re.search(r"mxfp4\s+e2m1 \(max 6\)\s+32\s+E8M0.*ocp, compressed_tensors", rows["mxfp4"])
    assert "per_channel" in rows["int8"] and "bitsandbytes" in rows["nf4"]


@pytest.mark.parametrize("name,count,first,last", [
    ("nvfp4", 8, "0", "6"), ("mxfp6_e2m3", 32, "0", "7.5"), ("mxfp8_e4m3", 127, "0", "448"),
    ("mxfp8_e5m2", 124, "0", "57344"), ("int4", 8, "0", "7"), ("nf4", 9, "0", "1"),
])
def test_value_grid(capsys: pytest.CaptureFixture, name: str, count: int, first: str, last: str) -> None:
    code, out, _ = _run(capsys, name)
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("non-negative element values"))
    assert line.startswith(f"non-negative element values ({count}): ")
    values = line.split(": ", 1)[1].split()
    assert len(values) == count and values[0] == first and values[-1] == last
    assert "SQNR" not in out  # stats only with --sample


def _stats(out: str) -> tuple[float, float, float]:
    m = re.search(r"relative error (\S+) \| SQNR (\S+) dB \| max abs error (\S+)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def test_sample_stats_match_a_direct_computation(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "nvfp4", "--sample", "--shape", "32x64", "--seed", "3")
    assert code == 0 and "sample: normal 32x64 seed 3" in out
    rel, sqnr, max_abs = _stats(out)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    err = (fake_quantize(x, "nvfp4").double() - x.double())
    want_rel = float(err.norm() / x.double().norm())
    # atol: the CLI prints 6 significant digits (and SQNR with 2 decimals)
    assert math.isclose(rel, want_rel, rel_tol=1e-5)
    assert math.isclose(sqnr, -20 * math.log10(want_rel), abs_tol=0.006)
    assert math.isclose(max_abs, float(err.abs().max()), rel_tol=1e-5)
    assert 15 < sqnr < 25  # NVFP4 on N(0,1): about 20 dB


def test_sample_options_change_the_format(capsys: pytest.CaptureFixture) -> None:
    _, floor_out, _ = _run(capsys, "mxfp4", "--sample", "--dist", "outliers", "--shape", "64x64")
    _, rceil_out, _ = _run(capsys, "mxfp4", "--sample", "--dist", "outliers", "--shape", "64x64",
                           "--scale-mode", "rceil")
    assert "scale_mode floor" in floor_out and "scale_mode rceil" in rceil_out
    assert _stats(floor_out) != _stats(rceil_out)
    _, out, _ = _run(capsys, "nvfp4", "--profile", "torchao", "--rounding", "half_away")
    assert "profile torchao" in out and "rounding half_away" in out


def test_stochastic_rounding_is_seeded(capsys: pytest.CaptureFixture) -> None:
    argv = ("mxfp4", "--sample", "--rounding", "stochastic", "--shape", "16x64", "--seed", "5")
    _, a, _ = _run(capsys, *argv)
    _, b, _ = _run(capsys, *argv)
    assert _stats(a) == _stats(b)


def test_unknown_name_lists_valid_names(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["formats", "nvfp5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nvfp5'" in err and all(name in err for name in FORMATS)


def test_option_the_format_does_not_take(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "nvfp4", "--scale-mode", "rceil")
    assert code == 2 and out == ""
    assert "unknown option 'scale_mode' for nvfp4" in err and "valid options" in err
    code, _, err = _run(capsys, "mxfp4", "--profile", "torchao")
    assert code == 2 and "valid profiles: ocp, compressed_tensors" in err


@pytest.mark.parametrize("bad", ["0x4", "4x", "abc"])
def test_bad_shape(capsys: pytest.CaptureFixture, bad: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["formats", "nvfp4", "--sample", "--shape", bad])
    assert exc.value.code == 2 and "shape" in capsys.readouterr().err
