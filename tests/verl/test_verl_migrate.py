"""`quarl verl migrate`: a fork-style launch script -> plain verl + the quarl.verl plugin; the fork's mistakes refused.

Run: pytest tests/verl/test_verl_migrate.py   (needs no verl: runs in quarl's main environment too)
"""

from pathlib import Path

import pytest

from quarl.cli import main
from quarl.verl.config import parse_config
from quarl.verl.migrate import MigrationRefused, migrate

FORK = (Path(__file__).parent / "data" / "fork_e13h.sh").read_text()


def test_overrides_rewritten_into_the_plugins():
    m = migrate(FORK, "/abs/e13h.quarl.yaml")
    assert "hw_error_injection" not in m.script and "noise_injection" not in m.script
    for line in ("actor_rollout_ref.model.external_lib=quarl.verl",
                 '+ray_kwargs.ray_init.runtime_env.env_vars.QUARL_VERL_CONFIG="$QUARL_VERL_CONFIG"',
                 "actor_rollout_ref.rollout.enforce_eager=True",
                 "worker_extension_cls=quarl.verl.rollout.QuarlWorkerExtension",
                 "agent_loop_manager_class=quarl.verl.agent_loop.QuarlAgentLoopManager",
                 "reward.custom_reward_function.path=pkg://quarl.verl.reward",
                 'QUARL_VERL_CONFIG="/abs/e13h.quarl.yaml"',
                 "trainer.experiment_name=E13h_MXFP4_W4A4_AQN", "trainer.logger=[console] $@"):
        assert line in m.script, line
    command = m.script[m.script.index("python3 -m verl.trainer.main_ppo"):].splitlines()
    assert all(line.rstrip().endswith("\\") for line in command[:-1]) and not command[-1].endswith("\\")
    cfg = parse_config(m.yaml)  # the written block loads through the plugin's strict loader
    assert cfg == m.config
    inj, aqn = cfg.injection, cfg.aqn
    assert inj.error_type == "mxfp4" and inj.injection_point.value == "both" and inj.use_ste
    assert inj.exclude == (r"(^|\.)lm_head($|\.)", r"(^|\.)embed_tokens($|\.)")
    assert (aqn.schedule, aqn.sigma_start, aqn.layer_multipliers, cfg.total_steps) == ("qerl", 0.01, {0: 2.0}, 58)
    assert len(m.notes) == 1 and "never forwarded" in m.notes[0]  # layer_sigma_config: the fork's runs ignored it


@pytest.mark.parametrize("change, reason", [
    (("injection_point=both", "injection_point=output"), "output injection quantizes the linear outputs"),
    (("exclude_modules=[lm_head,embed_tokens]", "exclude_modules=[lm_head,base_layer]"), "nothing was quantized"),
    (("error_type=mxfp4", "error_type=mxfp4 \\\n    trainer.hw_error_injection.use_ste=False"), "cuts the gradient"),
    (("sigma_start=0.01", "sigma_start=0.01 \\\n    trainer.noise_injection.epoch_aware=True"), "sigma was 0"),
    (("trainer.total_training_steps=58 \\\n", ""), "total_training_steps"),
    (("error_type=mxfp4", "error_type=mxfp4 \\\n    trainer.hw_error_injection.target_layer=[1]"),
     "did you mean 'target_layers'"),
])
def test_the_forks_mistakes_are_refused_with_the_reason(change, reason):
    with pytest.raises(MigrationRefused, match=reason):
        migrate(FORK.replace(*change), "/abs/x.yaml")


def test_every_reason_is_reported_at_once():
    bad = FORK.replace("injection_point=both", "injection_point=output").replace(
        "[lm_head,embed_tokens]", "[lm_head,base_layer]")
    with pytest.raises(MigrationRefused) as err:
        migrate(bad, "/abs/x.yaml")
    assert len(err.value.reasons) == 2


def test_cli_writes_script_and_block_or_refuses(tmp_path, capsys):
    script = tmp_path / "run_e13h.sh"
    script.write_text(FORK)
    assert main(["verl", "migrate", str(script)]) == 0
    out_script, block = tmp_path / "run_e13h.quarl.sh", tmp_path / "run_e13h.quarl.yaml"
    assert f'QUARL_VERL_CONFIG="{block.resolve()}"' in out_script.read_text()
    assert parse_config(block.read_text()).total_steps == 58
    script.write_text(FORK.replace("injection_point=both", "injection_point=output"))
    assert main(["verl", "migrate", str(script), "-o", str(tmp_path / "new.sh")]) == 2
    assert "output injection" in capsys.readouterr().err and not (tmp_path / "new.sh").exists()


def test_the_example_script_carries_every_plugin_override_and_a_valid_block():
    from quarl.verl.migrate import PLUGIN_OVERRIDES

    root = Path(__file__).resolve().parents[2] / "examples" / "verl"
    script = (root / "e13_w4a4.sh").read_text()
    for override in PLUGIN_OVERRIDES:
        key = override.split("=", 1)[0]
        assert key in script, key
    cfg = parse_config((root / "e13_w4a4.quarl.yaml").read_text())
    assert cfg.injection.injection_point.value == "both" and cfg.injection.use_ste and cfg.aqn_enabled
    assert f"trainer.total_training_steps={cfg.total_steps}" in script
