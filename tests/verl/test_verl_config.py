"""The ``quarl:`` block of a verl run and its seam (``QUARL_VERL_CONFIG``): strict, loud, the same on every worker.

Run: pytest tests/verl/test_verl_config.py   (needs no verl)
"""

import pytest

from quarl.verl import check_version
from quarl.verl.config import load_config, parse_config

BLOCK = "quarl:\n  injection: {scheme: W4A4}\n  aqn: {sigma_start: 0.02}\n  total_steps: 100\n"


def test_file_and_inline_yaml_give_the_same_spec(tmp_path):
    path = tmp_path / "quarl.yaml"
    path.write_text(BLOCK)
    a, b = load_config({"QUARL_VERL_CONFIG": str(path)}), load_config({"QUARL_VERL_CONFIG": BLOCK})
    assert a == b and a.digest() == b.digest() and a.aqn.sigma_start == 0.02 and a.reference == "policy"


@pytest.mark.parametrize("text, match", [
    ("quarl:\n  injection: {scheme: W4A4}\n  total_step: 3\n", "did you mean 'total_steps'"),
    ("quarl:\n  injection: {scheme: W4A4, use_stee: true}\n", "did you mean 'use_ste'"),
    ("quarl:\n  aqn: {sigma_start: 0.01}\n", "quarl.total_steps"),
    ("quarl:\n  injection: {scheme: W4A4, use_ste: false}\n", "use_ste is false"),
    ("quarl:\n  injection: {scheme: W4A4}\n  reference: unquantised\n", "did you mean 'unquantized'"),
    ("quarl:\n  injection: {scheme: W4A4}\nquarll: {}\n", "did you mean 'quarl'"),
    ("injection: {scheme: W4A4}\n", "one top-level 'quarl:' block"),
    ("quarl: {}\n", "nothing to do"),
])
def test_invalid_blocks_are_errors_naming_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        parse_config(text)


def test_missing_variable_or_file_fails_loudly(tmp_path):
    with pytest.raises(RuntimeError, match=r"\+ray_kwargs.ray_init.runtime_env.env_vars.QUARL_VERL_CONFIG"):
        load_config({})
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_config({"QUARL_VERL_CONFIG": str(tmp_path / "missing.yaml")})


@pytest.mark.parametrize("version, ok", [("0.9.1", True), ("0.9.3.dev0", True), ("0.9.0", False), ("0.10.0", False)])
def test_version_check(version, ok):
    if ok:
        check_version(version)
    else:
        with pytest.raises(ImportError, match=f"this is verl {version}"):
            check_version(version)


def test_cache_weights_switch():
    on = parse_config("quarl:\n  injection: {scheme: MXFP4}\n")
    off = parse_config("quarl:\n  injection: {scheme: MXFP4}\n  cache_weights: false\n")
    assert on.cache_weights is True and off.cache_weights is False and on.digest() != off.digest()
    with pytest.raises(ValueError, match="cache_weights"):
        parse_config("quarl:\n  injection: {scheme: MXFP4}\n  cache_weight: false\n")
