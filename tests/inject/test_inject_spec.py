"""InjectionSpec: scheme expansion, validation with actionable errors, strict YAML round trip.

Run: python -m pytest tests/inject/test_inject_spec.py -q
"""

import pytest

from quarl.inject import ApplyDuring, InjectionPoint, InjectionSpec


def test_noise_spec_defaults():
    s = InjectionSpec(error_type="relative_gaussian", error_scale=1e-3)
    assert s.injection_point is InjectionPoint.WEIGHT and s.apply_during is ApplyDuring.BOTH and s.use_ste
    assert s.exclude and not s.quantize_lm_head


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs an error_type"),
    (dict(error_type="relative_gaussain", error_scale=1.0), "did you mean 'relative_gaussian'"),
    (dict(error_type="relative_gaussian"), "needs error_scale > 0"),
    (dict(error_type="deadzone", error_scale=1.5), r"\(0, 1\)"),
    (dict(error_type="absolute_gaussian", error_scale=0.1, injection_point="inputs"), "did you mean 'input'"),
    (dict(error_type="absolute_gaussian", error_scale=0.1, apply_during="rollouts"), "did you mean 'rollout'"),
    (dict(error_type="absolute_gaussian", error_scale=0.1, targets=("(",)), "invalid regex"),
    (dict(error_type="absolute_gaussian", error_scale=0.1, target_layers=(-1,)), "non-negative"),
    (dict(error_type="absolute_gaussian", error_scale=0.1, format_options={"block_size": 32}), "format_options"),
    (dict(scheme="W4A8"), "did you mean"),
])
def test_invalid_specs_raise_actionable_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InjectionSpec(**kwargs)


@pytest.mark.parametrize("scheme,error_type,point", [
    ("W4A16", "mxfp4", "weight"), ("W4A4", "mxfp4", "both"), ("MXFP4A16", "mxfp4", "weight"),
    ("MXFP4", "mxfp4", "both"), ("NVFP4A16", "nvfp4", "weight"), ("NVFP4", "nvfp4", "both"),
    ("FP8", "fp8_e4m3", "both"),
])
def test_schemes_expand_to_explicit_fields(scheme, error_type, point):
    s = InjectionSpec(scheme=scheme)
    assert s.error_type == error_type and s.injection_point.value == point


def test_generic_scheme_takes_a_four_bit_error_type():
    assert InjectionSpec(scheme="W4A4", error_type="nvfp4").error_type == "nvfp4"
    with pytest.raises(ValueError, match="4-bit scheme"):
        InjectionSpec(scheme="W4A16", error_type="fp8_e4m3")


@pytest.mark.parametrize("kwargs", [
    dict(scheme="NVFP4", error_type="mxfp4"),
    dict(scheme="W4A16", injection_point="both"),
    dict(scheme="MXFP4A16", injection_point="input"),
])
def test_scheme_conflicting_with_explicit_field_raises(kwargs):
    with pytest.raises(ValueError, match="scheme"):
        InjectionSpec(**kwargs)


def test_format_rejects_error_scale_and_bad_options():
    with pytest.raises(ValueError, match="error_scale"):
        InjectionSpec(error_type="mxfp4", error_scale=0.1)
    with pytest.raises(ValueError):
        InjectionSpec(error_type="mxfp4", format_options={"scale_mod": "floor"})


@pytest.mark.parametrize("kwargs", [
    dict(scheme="NVFP4", apply_during="rollout", target_layers=(0, 1), targets=("q_proj",)),
    dict(error_type="mxfp4", format_options={"scale_mode": "rceil"}, injection_point="input"),
    dict(error_type="deadzone", error_scale=0.05, use_ste=False, seed=7, quantize_lm_head=True),
])
def test_yaml_round_trip(kwargs, tmp_path):
    spec = InjectionSpec(**kwargs)
    path = tmp_path / "spec.yaml"
    text = spec.to_yaml(path, header="quarl diagnose --spec spec.yaml")
    assert text.startswith("# quarl diagnose")
    assert InjectionSpec.from_yaml(path) == spec
    assert InjectionSpec.from_yaml(text) == spec


def test_yaml_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="did you mean 'error_scale'"):
        InjectionSpec.from_yaml("error_type: relative_gaussian\nerror_scal: 0.1\n")


def test_replace_drops_scheme_and_keeps_fields():
    s = InjectionSpec(scheme="NVFP4").replace(targets=("mlp",))
    assert s.scheme is None and s.error_type == "nvfp4" and s.targets == ("mlp",)


@pytest.mark.parametrize("kwargs,field,expected", [
    (dict(use_ste="no"), "use_ste", "bool"),
    (dict(use_ste=0), "use_ste", "bool"),
    (dict(quantize_lm_head="false"), "quantize_lm_head", "bool"),
    (dict(quantize_lm_head=1), "quantize_lm_head", "bool"),
    (dict(targets=3), "targets", "list of str"),
    (dict(exclude=("lm_head", 2)), "exclude", "list of str"),
    (dict(target_classes=None), "target_classes", "list of str"),
    (dict(target_layers=(True,)), "target_layers", "list of int"),
    (dict(target_layers="1"), "target_layers", "list of int"),
    (dict(seed=1.5), "seed", "int"),
    (dict(seed=True), "seed", "int"),
    (dict(error_scale="0.1"), "error_scale", "float"),
    (dict(error_scale=False), "error_scale", "float"),
    (dict(error_type=4), "error_type", "str"),
    (dict(format_options=[("block_size", 32)]), "format_options", "mapping"),
])
def test_field_types_are_strict(kwargs, field, expected):
    base = dict(error_type="relative_gaussian", error_scale=0.1)
    with pytest.raises(ValueError, match=rf"InjectionSpec\.{field} must be .*{expected}.*, got") as err:
        InjectionSpec(**{**base, **kwargs})
    assert repr(kwargs[field]) in str(err.value)


def test_field_types_accept_the_documented_forms():
    s = InjectionSpec(error_type="absolute_gaussian", error_scale=1, targets="q_proj", target_layers=[0, 2],
                      use_ste=False, quantize_lm_head=True, seed=3)
    assert s.error_scale == 1.0 and isinstance(s.error_scale, float)
    assert s.targets == ("q_proj",) and s.target_layers == (0, 2) and s.use_ste is False and s.quantize_lm_head


@pytest.mark.parametrize("line,field", [
    ("quantize_lm_head: 'false'", "quantize_lm_head"),
    ("use_ste: 'no'", "use_ste"),
    ("targets: 3", "targets"),
    ("error_scale: 1e-3", "error_scale"),  # YAML 1.1: no dot, so a string
])
def test_yaml_wrong_types_raise_naming_the_field(line, field):
    text = "error_type: relative_gaussian\nerror_scale: 0.1\n" if field != "error_scale" else "error_type: deadzone\n"
    with pytest.raises(ValueError, match=rf"InjectionSpec\.{field} must be"):
        InjectionSpec.from_yaml(text + line + "\n")


def test_yaml_unquoted_bool_is_a_bool():
    s = InjectionSpec.from_yaml("error_type: relative_gaussian\nerror_scale: 0.1\nquantize_lm_head: false\n")
    assert s.quantize_lm_head is False
