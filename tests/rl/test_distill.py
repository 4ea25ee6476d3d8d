"""`grpo.distill`: full-distribution KL to the unquantized base on the policy's completions, next to the reward."""

import pytest
import torch

from quarl.models import load_model
from quarl.rl import load_config
from quarl.rl.distill import distill_kl
from quarl.runs import read_metrics

W4A4 = "injection: {scheme: MXFP4}\n"


def test_distill_kl_matches_the_definition_and_masks_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    fwd = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(t || s)
    rev = torch.nn.functional.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # KL(s || t)
    for divergence, want in (("forward", fwd), ("reverse", rev)):
        loss, per_token = distill_kl(s, t, mask, divergence)
        torch.testing.assert_close(per_token, want)
        torch.testing.assert_close(loss, (want * mask).sum() / 3)
    loss, per_token = distill_kl(t, t, mask)
    assert float(loss) == 0.0 and torch.all(per_token.abs() < 1e-6)
    assert float(distill_kl(s, t, torch.zeros(2, 3))[0]) == 0.0  # empty mask: 0, not NaN


def test_distill_kl_gradient_moves_the_student_toward_the_teacher():
    torch.manual_seed(1)
    s, t, mask = torch.randn(4, 5, 11, requires_grad=True), torch.randn(4, 5, 11), torch.ones(4, 5)
    for divergence in ("forward", "reverse"):
        loss, _ = distill_kl(s, t, mask, divergence)
        (grad,) = torch.autograd.grad(loss, s)
        after, _ = distill_kl(s.detach() - 0.5 * grad, t, mask, divergence)
        assert float(after) < float(loss)
    with pytest.raises(ValueError, match="divergence"):
        distill_kl(s, t, mask, "js")
    with pytest.raises(ValueError, match="shape"):
        distill_kl(s, t[:, :3], mask)


def test_distill_config_errors():
    with pytest.raises(ValueError, match="needs an injection block"):
        load_config(None, ["grpo.distill=1.0"])
    with pytest.raises(ValueError, match="grpo.distill_divergence"):
        load_config(W4A4, ["grpo.distill=1.0", "grpo.distill_divergence=js"])
    with pytest.raises(ValueError, match="grpo.distill with aqn.apply_during=both"):
        load_config(W4A4, ["grpo.distill=1.0", "aqn.enabled=true", "aqn.apply_during=both"])


def _train_one_step_probing(tmp_path, tiny, probe):
    """One W4A4 step with grpo.distill 1.0; ``probe(hidden, teacher, inputs, hooks, model)`` sees every call of the
    distillation term before it runs. Returns (hooks, model)."""
    checked = []

    def probe(hidden, teacher, inputs, hooks, model):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        t, keep = inputs["completion_ids"].size(1), inputs["completion_mask"].bool()
        head = model.get_base_model().get_output_embeddings()
        rebuilt = torch.nn.functional.linear(hidden[:, -t - 1:-1], head.weight, head.bias).detach()
        with torch.no_grad(), hooks.phase("training"):
            want = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1:-1]
        checked.append((rebuilt[keep] - want[keep]).abs().max().item())

    _train_one_step_probing(tmp_path, tiny, probe)
    assert len(checked) == 1 and checked[0] < 1e-4
