"""Train config: strict keys everywhere (file and --set), blocks, examples, YAML round trip."""

import pytest
import yaml

from quarl.inject import InjectionSpec
from quarl.noise import AQNConfig
from quarl.rl import TrainConfig, apply_overrides, load_config
from quarl.cli.train import example_text


def test_defaults_are_the_documented_ones():
    cfg = load_config(None)
    assert cfg.injection is None and cfg.aqn is None and not cfg.aqn_enabled
    g = cfg.grpo
    assert (g.loss_type, g.beta, g.temperature, g.lr, g.tis_cap, g.gradient_checkpointing) == \
        ("dapo", 0.0, 1.0, 1e-4, None, False)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ("all-linear",))


def test_blocks_become_typed_configs_and_round_trip():
    cfg = load_config("injection: {scheme: NVFP4, apply_during: rollout}\naqn: {sigma_start: 0.02}\n")
    assert isinstance(cfg.injection, InjectionSpec) and cfg.injection.error_type == "nvfp4"
    assert cfg.injection.apply_during.value == "rollout"
    assert isinstance(cfg.aqn, AQNConfig) and cfg.aqn.sigma_start == 0.02 and cfg.aqn_enabled
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("text, match", [
    ("grpo: {stepz: 3}", "did you mean 'steps'"),
    ("modle: {name: x}", "did you mean 'model'"),
    ("aqn: {sigma_strat: 0.1}", "did you mean 'sigma_start'"),
    ("injection: {scheme: MXFP4, use_stee: true}", "did you mean 'use_ste'"),
    ("lora: {rank: 8}", "valid keys"),
    ("grpo: {loss_type: ppo}", "grpo.loss_type"),
    ("grpo: {generations: 1}", "generations"),
    ("grpo: {tis_cap: 0.5}", "tis_cap"),
    ("run: {keep_checkpoints: 1}", "keep_checkpoints"),
])
def test_unknown_or_bad_keys_raise(text, match):
    with pytest.raises(ValueError, match=match):
        load_config(text + "\n")


def test_set_overrides_are_strict_and_typed():
    cfg = load_config("grpo: {steps: 5}\n", ["grpo.steps=7", "injection.scheme=MXFP4", "aqn.enabled=false",
                                             "grpo.lr=2.0e-4", "run.name=E13g"])
    assert cfg.grpo.steps == 7 and cfg.injection.scheme == "MXFP4" and cfg.aqn is not None and not cfg.aqn_enabled
    assert cfg.grpo.lr == 2e-4 and cfg.run.name == "E13g"
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        load_config(None, ["grpo.step=3"])
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["grpo.steps"])
    with pytest.raises(ValueError, match="not a block"):
        apply_overrides({"grpo": {"steps": 3}}, ["grpo.steps.x=1"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_the_example_is_a_valid_ready_to_run_config():
    text = example_text()
    assert text.startswith("# quarl train")
    cfg = load_config(text)
    assert isinstance(cfg, TrainConfig) and cfg.injection.scheme == "MXFP4" and cfg.aqn_enabled
    assert cfg.grpo.tis_cap is None and load_config(text, ["grpo.tis_cap=2.0"]).grpo.tis_cap == 2.0
