"""`quarl verl migrate SCRIPT.sh`: rewrite a launch script of the hardware-error verl fork into plain verl + quarl.

The fork configured its hooks with Hydra overrides under ``trainer.hw_error_injection.*`` and
``trainer.noise_injection.*``. This module reads those overrides from a bash launch script, maps them onto the
``quarl:`` block (`quarl.verl.config`: the same schema as ``quarl train``'s ``injection`` and ``aqn``), and rewrites
the script: the fork's overrides are removed and the plugin's are added (``external_lib``, the config seam, eager
vLLM, the worker extension, the GSM8K reward). Pure text in, text out; no verl needed.

What the fork did wrong is refused, with the reason, instead of translated into a run that would lie again:
- an ``injection_point=output`` run named W4A4: output injection quantizes the linear *outputs*; W4A4 is weights +
  inputs (``injection_point: both``);
- ``exclude_modules`` containing ``base_layer``: under LoRA every quantizable linear is a ``base_layer``, so the run
  quantized nothing (the fork's E13e ran this way);
- ``use_ste=False``: the gradient through every quantized linear is cut (W4A4 stuck at 7-10% GSM8K);
- epoch-aware AQN (any ``noise_injection.*epoch*`` key): it always asked for step 0 of 1, so sigma was 0 -- a no-op;
- AQN without ``trainer.total_training_steps``: the schedule needs the run length.
``layer_sigma_config`` is kept, as quarl's ``aqn.layer_multipliers``, with a note: the fork never forwarded it, so
its runs used the same sigma on every layer. Unknown keys under the fork's two prefixes are refused too (a dropped
key is a silent change of the experiment).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Any

import yaml

from quarl import configio
from quarl.inject.spec import InjectionSpec
from quarl.noise import AQNConfig
from quarl.verl.config import ENV, VerlQuarlConfig

HW = "trainer.hw_error_injection."
NOISE = "trainer.noise_injection."
_OVERRIDE = re.compile(r"""^\+{0,2}(?P<key>[A-Za-z_][\w.]*)=(?P<value>.*)$""")
_HW_KEYS = ("enabled", "error_type", "injection_point", "apply_during", "target_modules", "target_layers",
            "exclude_modules", "error_scale", "use_ste", "seed")
_NOISE_KEYS = ("enabled", "sigma_start", "sigma_end", "num_stages", "layer_sigma_config")
PLUGIN_OVERRIDES = (
    "actor_rollout_ref.model.external_lib=quarl.verl",
    f'+ray_kwargs.ray_init.runtime_env.env_vars.{ENV}="${ENV}"',
    "actor_rollout_ref.rollout.enforce_eager=True",
    "actor_rollout_ref.model.lora.merge=True",  # vLLM's LoRA layers call the base kernel directly, skipping hooks
    "+actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls=quarl.verl.rollout.QuarlWorkerExtension",
    "+actor_rollout_ref.rollout.agent.agent_loop_manager_class=quarl.verl.agent_loop.QuarlAgentLoopManager",
    "reward.custom_reward_function.path=pkg://quarl.verl.reward",
    "reward.custom_reward_function.name=compute_score",
)


class MigrationRefused(ValueError):
    """The script asks for something the fork did wrong; ``reasons`` explains each."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("refused:\n" + "\n".join(f"- {r}" for r in reasons))


@dataclasses.dataclass(frozen=True)
class Migration:
    script: str  # the rewritten launch script
    config: VerlQuarlConfig  # the quarl block
    yaml: str  # the block as the file the script points at
    notes: tuple[str, ...]  # what the reader must know (e.g. a setting the fork never applied)


def _value(raw: str) -> Any:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    if raw.startswith("{"):
        raw = re.sub(r":(?=\S)", ": ", raw)  # Hydra's {0:2.0} is YAML's {0: 2.0}
    return yaml.safe_load(raw) if raw else None


def _overrides(script: str) -> tuple[list[tuple[int, str, str]], dict[str, str]]:
    """(line index, key, raw value) of every fork override; and every other override (key -> raw value)."""
    fork, others = [], {}
    for i, line in enumerate(script.splitlines()):
        body = line.strip().removesuffix("\\").strip()
        if not body or body.startswith("#"):
            continue
        try:
            tokens = shlex.split(body, comments=True)
        except ValueError:
            tokens = body.split()
        for token in tokens:
            m = _OVERRIDE.match(token)
            if not m:
                continue
            key, value = m["key"], m["value"]
            (fork.append((i, key, value)) if key.startswith((HW, NOISE)) else others.__setitem__(key, value))
    return fork, others


def _fork_settings(fork: list[tuple[int, str, str]]) -> tuple[dict, dict, list[str]]:
    hw, noise, refusals = {}, {}, []
    for _, key, raw in fork:
        block, valid, prefix = (hw, _HW_KEYS, HW) if key.startswith(HW) else (noise, _NOISE_KEYS, NOISE)
        name = key[len(prefix):]
        if "epoch" in name and prefix == NOISE:
            refusals.append(f"{key}: the fork's epoch-aware AQN always asked for step 0 of 1, so sigma was 0 -- the "
                            "noise was never applied. quarl's AQN follows the optimizer step; remove the key")
            continue
        if name not in valid:
            refusals.append(f"{key}: {configio.unknown_key_error(name, valid, prefix.rstrip('.'))}")
            continue
        block[name] = _value(raw)
    return hw, noise, refusals


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _injection(hw: dict, others: dict, refusals: list[str]) -> InjectionSpec | None:
    if not hw or hw.get("enabled") is False:
        return None
    point = str(hw.get("injection_point", "weight"))
    named = " ".join(v for k, v in others.items() if "name" in k)
    if point == "output" and "w4a4" in named.lower():
        refusals.append("injection_point=output in a run named W4A4: output injection quantizes the linear outputs, "
                        "not the weights and inputs. W4A4 is injection_point=both; fix the script, then migrate")
    exclude = _as_tuple(hw.get("exclude_modules"))
    if any("base_layer" in str(e) for e in exclude):
        refusals.append("exclude_modules contains base_layer: under LoRA every quantizable linear is a base_layer, so "
                        "nothing was quantized (the fork's E13e ran this way). quarl never quantizes LoRA adapters "
                        "and always quantizes base_layer; drop base_layer from the exclusions")
    if hw.get("use_ste") is False:
        refusals.append("use_ste=False cuts the gradient through every quantized linear (W4A4 stuck at 7-10% GSM8K); "
                        "quarl's verl plugin requires use_ste: true")
    kwargs: dict[str, Any] = {"error_type": hw.get("error_type", "mxfp4"), "injection_point": point,
                              "apply_during": hw.get("apply_during", "both"), "use_ste": True}
    if hw.get("target_modules"):
        kwargs["targets"] = tuple(re.escape(str(t)) for t in _as_tuple(hw["target_modules"]))
    if exclude:
        kwargs["exclude"] = tuple(rf"(^|\.){re.escape(str(e))}($|\.)" for e in exclude if "base_layer" not in str(e))
    if hw.get("target_layers"):
        kwargs["target_layers"] = tuple(int(i) for i in _as_tuple(hw["target_layers"]))
    for name in ("error_scale", "seed"):
        if hw.get(name) is not None:
            kwargs[name] = hw[name]
    return InjectionSpec(**kwargs)


def _aqn(noise: dict, notes: list[str]) -> AQNConfig | None:
    if not noise or noise.get("enabled") is False:
        return None
    kwargs: dict[str, Any] = {"schedule": "qerl"}
    for name in ("sigma_start", "sigma_end", "num_stages"):
        if noise.get(name) is not None:
            kwargs[name] = noise[name]
    layers = noise.get("layer_sigma_config")
    if layers:
        kwargs["layer_multipliers"] = {int(k): float(v) for k, v in dict(layers).items()}
        notes.append("layer_sigma_config became aqn.layer_multipliers. The fork never forwarded this setting: its runs "
                     "used the same sigma on every layer. This migrated run applies the multipliers, so it is a "
                     "different experiment from the fork's")
    return AQNConfig(**kwargs)


def migrate(script: str, config_path: str) -> Migration:
    """Rewrite ``script`` (the fork's launch script); ``config_path`` is where the quarl block will be written.

    Raises:
        MigrationRefused: every reason the script cannot be migrated as it stands (all of them at once).
    """
    fork, others = _overrides(script)
    if not fork:
        raise MigrationRefused([f"no {HW}* or {NOISE}* override found: nothing to migrate"])
    hw, noise, refusals = _fork_settings(fork)
    notes: list[str] = []
    injection, aqn = _injection(hw, others, refusals), _aqn(noise, notes)
    steps = _value(others["trainer.total_training_steps"]) if "trainer.total_training_steps" in others else None
    if aqn is not None and not isinstance(steps, int):
        refusals.append("AQN needs the run length: set trainer.total_training_steps=N in the script (quarl's sigma "
                        "schedule is a function of the step and the total)")
    if refusals:
        raise MigrationRefused(refusals)
    config = VerlQuarlConfig(injection=injection, aqn=aqn, total_steps=steps if aqn is not None else None)
    return Migration(_rewrite(script, {i for i, _, _ in fork}, config_path), config,
                     configio.dump_yaml({"quarl": config}, header="quarl block for verl (quarl verl migrate)"),
                     tuple(notes))


def _rewrite(script: str, fork_lines: set[int], config_path: str) -> str:
    lines = script.splitlines()
    kept = [line for i, line in enumerate(lines) if i not in fork_lines]
    anchor = next((i for i, line in enumerate(kept) if "main_ppo" in line), None)
    if anchor is None:
        raise MigrationRefused(["no verl.trainer.main_ppo command found in the script"])
    indent = "    "
    added = [f"{indent}{o} \\" for o in PLUGIN_OVERRIDES]
    header = [f'{ENV}="{config_path}"  # the quarl block (quarl verl migrate); every worker reads it']
    out = kept[:anchor] + header + kept[anchor:anchor + 1] + added + kept[anchor + 1:]
    # the last override of the command must not end in a continuation
    while out and not out[-1].strip():
        out.pop()
    if out and out[-1].rstrip().endswith("\\"):
        out[-1] = out[-1].rstrip()[:-1].rstrip()
    return "\n".join(out) + "\n"
