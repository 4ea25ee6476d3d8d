"""The TRL internals quarl overrides and reads (`quarl.rl.trl_contract`) against the installed TRL.

A TRL upgrade that renames a method, changes its leading parameters, drops an attribute, a batch key or one of the
code shapes quarl relies on fails `test_installed_trl_meets_the_contract`, naming every broken item with a permalink
to the TRL source it was read from. The other tests prove the checker catches each kind of break on fake classes.
"""

import inspect
import re

import pytest

from quarl.rl import trl_contract as C


def test_installed_trl_meets_the_contract():
    problems = C.contract_problems()
    assert not problems, "the installed TRL breaks what quarl.rl.engine relies on:\n" + "\n".join(problems)
    links = [u.link for u in C.METHODS] + list(C.ATTRIBUTES.values()) + [f.link for f in C.FACTS]
    assert len(C.FACTS) == 20 and all(re.fullmatch(r"https://github\.com/huggingface/(trl|transformers)/blob/v[\d.]+/"
                                                   r"[\w/]+\.py#L\d+(-L\d+)?", link) for link in links)


def test_every_override_of_the_engine_is_in_the_contract():
    """A new override of a TRL method must be added to the contract (and to the engine's table)."""
    from trl import GRPOTrainer

    from quarl.rl import engine
    from quarl.rl.engine import QuarlGRPOTrainer

    overridden = {name for name, value in vars(QuarlGRPOTrainer).items()
                  if inspect.isfunction(value) and name != "__init__" and hasattr(GRPOTrainer, name)}
    listed = {use.name for use in C.METHODS}
    assert overridden <= listed, f"overrides missing from quarl.rl.trl_contract.METHODS: {overridden - listed}"
    in_table = set(re.findall(r"^\| (_?[a-z_]+),? ", engine.__doc__, flags=re.M))
    assert overridden <= in_table, f"overrides missing from the table of quarl.rl.engine: {overridden - in_table}"


class _Trainer:
    def __init__(self):
        self._metrics = {}
        self.use_vllm: bool = False

    def _compute_loss(self, model, inputs):
        logps = self._get_per_token_logps_and_entropies(model, inputs)
        return logps

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None):
        return None


USES = (C.MethodUse("_compute_loss", ("self", "model", "inputs"), "link-1"),
        C.MethodUse("_get_per_token_logps_and_entropies", ("self", "model", "input_ids", "attention_mask",
                                                           "logits_to_keep", "batch_size"), "link-2"))
FACT = (C.SourceFact("_compute_loss", r"self\._get_per_token_logps_and_entropies\(\s*model,", 1, "policy first",
                     "link-3"),)


def test_the_checker_passes_a_class_that_keeps_the_contract():
    assert C.method_problems(_Trainer, USES) == []
    assert C.attribute_problems(_Trainer, {"_metrics": "l", "use_vllm": "l"}) == []
    assert C.source_problems(_Trainer, FACT) == []


def test_the_checker_catches_a_renamed_method():
    class Renamed:  # the same trainer after an upgrade that renamed _compute_loss
        def _compute_policy_loss(self, model, inputs):
            return None

    (problem,) = C.method_problems(Renamed, USES[:1])
    assert "Renamed._compute_loss is gone" in problem and "link-1" in problem


@pytest.mark.parametrize("signature, why", [
    ("def f(self, model, input_ids, mask, logits_to_keep, batch_size=None): ...", "renamed parameter"),
    ("def f(self, model, input_ids, attention_mask, batch_size=None): ...", "dropped parameter"),
    ("def f(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *, mode): ...", "new required"),
])
def test_the_checker_catches_a_changed_signature(signature, why):
    namespace = {}
    exec(signature, namespace)
    changed = type("Changed", (_Trainer,), {"_get_per_token_logps_and_entropies": namespace["f"]})
    (problem,) = C.method_problems(changed, USES)
    assert "_get_per_token_logps_and_entropies" in problem and "link-2" in problem, why


def test_the_checker_catches_a_missing_attribute_and_a_changed_source():
    problems = C.attribute_problems(_Trainer, {"_metrics": "l", "_last_loaded_step": "link-4"})
    assert problems == ["_Trainer no longer assigns self._last_loaded_step (quarl reads it; was link-4)"]

    class Reordered(_Trainer):
        def _compute_loss(self, model, inputs):
            return self._get_per_token_logps_and_entropies(self.ref_model, inputs)

    (problem,) = C.source_problems(Reordered, FACT)
    assert "occurs 0 times, expected 1" in problem and "policy first" in problem
    (problem,) = C.source_problems(_Trainer, (C.SourceFact("no.such.module:f", "x", None, "m", "l"),))
    assert "cannot read its source" in problem


def test_an_untested_or_missing_trl_fails_with_the_fix(monkeypatch):
    assert C.check_trl().startswith("1.16")
    monkeypatch.setattr(C.metadata, "version", lambda name: "1.17.2")
    with pytest.raises(ImportError, match=r"trl>=1.16,<1.17.*found trl 1.17.2"):
        C.check_trl()

    def missing(name):
        raise C.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(C.metadata, "version", missing)
    with pytest.raises(ImportError, match=r"pip install -e '.\[train\]'"):
        C.check_trl()


def test_every_test_the_engine_table_names_exists():
    from pathlib import Path

    from quarl.rl import engine

    named = re.findall(r"guarded by (test_\w+\.py)::(test_\w+)", engine.__doc__)
    assert len(named) >= 10
    here = Path(__file__).parent
    missing = [f"{f}::{t}" for f, t in named if not re.search(rf"^def {t}\(", (here / f).read_text(), flags=re.M)]
    assert not missing, f"the table of quarl.rl.engine names tests that do not exist: {missing}"
