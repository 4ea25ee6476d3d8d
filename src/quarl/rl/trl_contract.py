"""What quarl relies on inside TRL, written down so that a TRL upgrade fails loudly in one place.

`quarl.rl.engine` subclasses TRL's ``GRPOTrainer`` and overrides private methods; it also reads private attributes,
batch keys and the shape of TRL's code (one ``generate`` call per rollout, the policy's log-probs first inside the
loss). None of that is TRL's public API, so each item is listed here with a permalink to the tagged TRL source it was
read from, and `contract_problems` checks every item against the installed TRL:

- `MethodUse`: the method exists and its leading parameters are the ones quarl passes or accepts, in that order, with
  no new required parameter after them (``inspect.signature``);
- attributes: the name is assigned (``self.NAME = ...``) somewhere in the class or its bases;
- `SourceFact`: a regular expression occurs in a method's (or function's) source the stated number of times -- the
  assumptions that a signature cannot show (a batch key TRL writes, one ``generate`` call, a keyword argument).

``tests/rl/test_trl_contract.py`` runs the check (one test, every broken item in its message). `check_trl` refuses a
TRL outside the tested version range before anything is imported from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from importlib import metadata
from typing import Any

from packaging.version import Version

TRL_MIN, TRL_MAX = "1.16", "1.17"  # tested range: trl>=1.16,<1.17
TRL_TAG = "v1.16.0"
TRL_SRC = f"https://github.com/huggingface/trl/blob/{TRL_TAG}/trl"
GRPO = f"{TRL_SRC}/trainer/grpo_trainer.py"
HF_TRAINER = "https://github.com/huggingface/transformers/blob/v5.25.0/src/transformers/trainer.py"


def check_trl() -> str:
    """The installed TRL version; ImportError with the fix when TRL is missing or outside the tested range."""
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise ImportError(f"quarl train needs TRL: pip install -e '.[train]' (trl>={TRL_MIN},<{TRL_MAX})") from None
    if not Version(TRL_MIN) <= Version(version) < Version(TRL_MAX):
        raise ImportError(f"quarl train is built on trl>={TRL_MIN},<{TRL_MAX} (it overrides TRL internals); found "
                          f"trl {version}. Install the tested range: pip install 'trl>={TRL_MIN},<{TRL_MAX}'")
    return version


@dataclasses.dataclass(frozen=True)
class MethodUse:
    """A method quarl overrides or calls: its leading parameter names (``self`` first), in order."""

    name: str
    params: tuple[str, ...]
    link: str


@dataclasses.dataclass(frozen=True)
class SourceFact:
    """``pattern`` (a regex) occurs ``count`` times (None: at least once) in the source of ``where``: a method of the
    checked class, or ``"module:Qualified.name"`` for anything else."""

    where: str
    pattern: str
    count: int | None
    meaning: str
    link: str


METHODS = (
    MethodUse("_generate_single_turn", ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                        "has_tool_images"), f"{GRPO}#L1763"),
    MethodUse("_generate_and_score_completions", ("self", "inputs"), f"{GRPO}#L2324"),
    MethodUse("_compute_loss", ("self", "model", "inputs"), f"{GRPO}#L3020"),
    MethodUse("_get_per_token_logps_and_entropies", ("self", "model", "input_ids", "attention_mask",
                                                     "logits_to_keep", "batch_size"), f"{GRPO}#L1419"),
    MethodUse("training_step", ("self", "model", "inputs", "num_items_in_batch"), f"{GRPO}#L1510"),
    MethodUse("log", ("self", "logs", "start_time"), f"{GRPO}#L3302"),
    MethodUse("_save_checkpoint", ("self", "model", "trial"), f"{GRPO}#L3384"),
    MethodUse("_load_optimizer_and_scheduler", ("self", "checkpoint"), f"{GRPO}#L3397"),
    MethodUse("create_optimizer", ("self", "model"), f"{HF_TRAINER}#L1274"),
    MethodUse("_get_output_dir", ("self", "trial"), f"{HF_TRAINER}#L3388"),
)

# Instance attributes the overrides read (besides the HF Trainer's public ``args``, ``state``, ``model``).
ATTRIBUTES = {
    "_metrics": f"{GRPO}#L1080",  # the per-mode metric lists TRL averages and logs
    "_last_loaded_step": f"{GRPO}#L1140",  # the step whose weights vLLM holds
    "vllm_generation": f"{GRPO}#L1107",
    "use_vllm": f"{GRPO}#L811",
    "eos_token_ids": f"{GRPO}#L416",
    "temperature": f"{GRPO}#L789",
    "num_generations": f"{GRPO}#L783",
    "model_wrapped": f"{HF_TRAINER}#L511",
    "accelerator": f"{HF_TRAINER}#L864",
}

# One fact per two lines: where (a method of GRPOTrainer, or module:qualname), how often the pattern occurs ("+" = at
# least once) and the regex (the rest of the line); then, indented, the source lines under trl/ at the tag and what
# quarl assumes.
_FACT_TABLE = r"""
_generate_single_turn  1  unwrapped_model\.generate\(
    trainer/grpo_trainer.py#L1873-L1875  the HF path generates with one generate call per rollout batch (quarl
    records its scores)
_generate_single_turn  1  \.generate\(\s*\*\*generate_inputs,\s*generation_config=
    trainer/grpo_trainer.py#L1873-L1875  generate receives generation_config by keyword (quarl's wrapper turns on
    output_scores in it)
_generate_single_turn  1  logprobs = None  # not used
    trainer/grpo_trainer.py#L1889  the HF path returns no rollout log-probs (quarl supplies them)
_generate_single_turn  1  if self\.state\.global_step != self\._last_loaded_step:
    trainer/grpo_trainer.py#L1769-L1772  vLLM weights are synced only when _last_loaded_step differs (quarl syncs
    first, then adds the AQN noise)
_compute_loss  1  self\._get_per_token_logps_and_entropies\(\s*model,
    trainer/grpo_trainer.py#L3030  the loss computes the policy's log-probs in one call, the loss's first (quarl
    captures it)
_compute_loss  1  if advantages\.dim\(\) == 1:
    trainer/grpo_trainer.py#L3058-L3059  the loss accepts (B, T) advantages (quarl's TIS weights them per token)
_generate_and_score_completions  1  use_adapter\(model, adapter_name="ref"
    trainer/grpo_trainer.py#L2724-L2737  the beta-KL reference forward runs the PEFT model with the "ref" adapter or
    with adapters disabled
_generate_and_score_completions  +  if self\.use_vllm and self\.vllm_importance_sampling_correction:
    trainer/grpo_trainer.py#L2660  TRL's own importance sampling runs only with vLLM (quarl adds TIS on the HF path)
trl.trainer.utils:add_fused_lm_head  1  backbone_attr = "base_model"
    trainer/utils.py#L1593  the fused LM head runs model.base_model (quarl's distillation hook sits there)
trl.trainer.utils:add_fused_lm_head  +  backbone_outputs\.last_hidden_state
    trainer/utils.py#L1616-L1621  the fused LM head projects the backbone's last_hidden_state
trl.generation.vllm_generation:VLLMGeneration.sync_weights  1  driver_worker\.model_runner\.model\.load_weights\(
    generation/vllm_generation.py#L509-L511  a colocated sync loads weights into the module quarl's vLLM injector is
    attached to
trl.generation.vllm_generation:VLLMGeneration._init_vllm  1  self\.llm = LLM\(
    generation/vllm_generation.py#L347  TRL builds vllm.LLM through its module-level name LLM (quarl wraps it with
    enforce_eager=True)
"""


def _parse_facts(table: str) -> tuple[SourceFact, ...]:
    blocks: list[list[str]] = []
    for line in table.strip().splitlines():
        if line.startswith(" "):
            blocks[-1].append(line.strip())
        else:
            blocks.append([line])
    facts = []
    for head, *rest in blocks:
        where, count, pattern = head.split(maxsplit=2)
        link, meaning = " ".join(rest).split(maxsplit=1)
        facts.append(SourceFact(where, pattern, None if count == "+" else int(count), meaning, f"{TRL_SRC}/{link}"))
    return tuple(facts)


_SCORE = "_generate_and_score_completions"
FACTS = (
    *_parse_facts(_FACT_TABLE),
    *(SourceFact(_SCORE, rf'"{key}": {key},', 1, f"the batch holds {key!r}", f"{GRPO}#L2898-L2905")
      for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")),
    *(SourceFact(_SCORE, rf'output\["{key}"\] = {key}', 1, f"the batch holds {key!r} when TRL computed it",
                 f"{GRPO}#L2906-L2913")
      for key in ("old_per_token_logps", "sampling_per_token_logps", "ref_per_token_logps")),
)


def method_problems(cls: type, uses: tuple[MethodUse, ...] = METHODS) -> list[str]:
    """One line per method of ``cls`` that is missing, or whose leading parameters changed."""
    out = []
    for use in uses:
        fn = getattr(cls, use.name, None)
        if not callable(fn):
            out.append(f"{cls.__name__}.{use.name} is gone (quarl overrides or calls it; was {use.link})")
            continue
        params = list(inspect.signature(fn).parameters.values())
        names = tuple(p.name for p in params[:len(use.params)])
        extra = [p.name for p in params[len(use.params):] if p.default is p.empty
                 and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if names != use.params or extra:
            out.append(f"{cls.__name__}.{use.name}{inspect.signature(fn)}: quarl expects leading parameters "
                       f"{use.params}{' and no new required ' + str(extra) if extra else ''} ({use.link})")
    return out


def attribute_problems(cls: type, names: dict[str, str] = ATTRIBUTES) -> list[str]:
    """One line per attribute never assigned as ``self.NAME = ...`` in ``cls`` or its bases."""
    assigned: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        assigned.update(re.findall(r"self\.(\w+)\s*(?::[^=\n]+)?=(?!=)", source))
    return [f"{cls.__name__} no longer assigns self.{name} (quarl reads it; was {link})"
            for name, link in names.items() if name not in assigned]


def source_problems(cls: type, facts: tuple[SourceFact, ...] = FACTS) -> list[str]:
    """One line per `SourceFact` whose pattern no longer occurs as often as stated."""
    out = []
    for fact in facts:
        try:
            source = inspect.getsource(_resolve(cls, fact.where))
        except (AttributeError, ImportError, OSError, TypeError) as exc:
            out.append(f"{fact.where}: cannot read its source ({exc}); quarl assumes {fact.meaning} ({fact.link})")
            continue
        n = len(re.findall(fact.pattern, source))
        if (n != fact.count) if fact.count is not None else n == 0:
            want = f"{fact.count}" if fact.count is not None else "at least 1"
            out.append(f"{fact.where}: /{fact.pattern}/ occurs {n} times, expected {want}; quarl assumes "
                       f"{fact.meaning} ({fact.link})")
    return out


def contract_problems(cls: type | None = None) -> list[str]:
    """Every broken item of the contract against ``cls`` (default: the installed TRL's ``GRPOTrainer``)."""
    if cls is None:
        check_trl()
        from trl import GRPOTrainer

        cls = GRPOTrainer
    return method_problems(cls) + attribute_problems(cls) + source_problems(cls)


def _resolve(cls: type, where: str) -> Any:
    if ":" not in where:
        return getattr(cls, where)
    module, qualname = where.split(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
