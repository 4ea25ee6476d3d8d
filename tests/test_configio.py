"""quarl.configio: strict YAML <-> frozen dataclasses (unknown keys name the nearest valid key).

Run: python -m pytest tests/test_configio.py -q
"""

import dataclasses
import enum

import pytest

from quarl.configio import dump_yaml, from_dict, load_yaml, nearest, to_dict


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    layers: tuple[int, ...] = (0, 1)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    inner: Inner = Inner()
    mode: Mode = Mode.FAST
    seed: int | None = None


def test_round_trip_nested_tuple_enum(tmp_path):
    cfg = Outer(name="x", inner=Inner(lr=0.5, layers=(3, 4)), mode=Mode.SLOW, seed=7)
    path = tmp_path / "c.yaml"
    text = dump_yaml(cfg, path, header="quarl something c.yaml")
    assert text.startswith("# quarl something c.yaml\n")
    assert to_dict(cfg)["mode"] == "slow"
    back = load_yaml(Outer, path)
    assert back.inner == Inner(lr=0.5, layers=(3, 4)) and isinstance(back.inner.layers, tuple)
    assert back.name == "x" and back.seed == 7
    assert back.mode == "slow"  # enums are written by value; the dataclass's __post_init__ owns conversion


def test_unknown_key_names_nearest():
    with pytest.raises(ValueError, match=r"unknown key 'lrr' in Outer.inner \(did you mean 'lr'\?\)"):
        from_dict(Outer, {"inner": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="valid keys: inner, mode, name, seed"):
        load_yaml(Outer, "nmae: x\nseed: 1\n")


def test_non_mapping_and_nearest():
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(Outer, ["a"])
    assert nearest("injection_pont", ["injection_point", "error_type"]) == "injection_point"
    assert nearest("zzz", ["injection_point"]) is None
