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
    """One W4A4 step with grpo.distill 1.0; ``probe(hidden, teacher, inputs, attached, model)`` sees every call of
    the distillation term before it runs. Returns (attached, model)."""
    from quarl.rl.run import _build

    cfg = load_config(W4A4, tiny + ["grpo.steps=1", "grpo.distill=1.0"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, model = _build(cfg, tmp_path, 0)
    loss_fn = trainer.distill.loss

    def loss(trainer_, hidden, teacher, inputs):
        probe(torch.cat(hidden), teacher, inputs, attached, model)
        return loss_fn(trainer_, hidden, teacher, inputs)

    trainer.distill.loss = loss
    trainer.train()
    recorder.close()
    return attached, model


def test_distill_uses_the_unquantized_teacher_and_the_loss_forwards_logits(tmp_path, tiny):
    seen = []
    attached, model = _train_one_step_probing(tmp_path, tiny, lambda h, t, i, a, m: seen.append((h.detach(), t, i)))
    assert len(seen) == 1
    hidden, teacher, inputs = seen[0]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    t, keep = inputs["completion_ids"].size(1), inputs["completion_mask"].bool()
    fp32, _ = load_model("testbed:tiny")  # the same shipped weights, never injected
    with torch.no_grad():
        want_teacher = fp32(input_ids=ids, attention_mask=mask).logits[:, -t - 1:-1]
    torch.testing.assert_close(teacher[keep], want_teacher[keep], rtol=1e-5, atol=1e-5)
    hidden_size = model.get_base_model().get_output_embeddings().weight.size(1)
    assert hidden.shape == (ids.size(0), ids.size(1), hidden_size)  # the whole sequence's last hidden states
    stats = attached.injector.stats().values()
    assert all(s["fires"]["training"] == 1 for s in stats)  # the loss forward only: no extra quantized forward
    assert all(s["skipped"]["bypassed"] == 1 for s in stats)  # the teacher forward
    row = read_metrics(tmp_path)[-1]
    assert row["distill/kl"] > 1e-4  # W4A4 policy vs the full-precision base


def test_distill_student_logits_are_the_policys(tmp_path, tiny):
    """The logits rebuilt from the loss forward's hidden states equal a separate forward of the policy (training
    phase, injected) before the update."""
    checked = []

    def probe(hidden, teacher, inputs, attached, model):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        t, keep = inputs["completion_ids"].size(1), inputs["completion_mask"].bool()
        head = model.get_base_model().get_output_embeddings()
        rebuilt = torch.nn.functional.linear(hidden[:, -t - 1:-1], head.weight, head.bias).detach()
        with torch.no_grad(), attached.phase("training"):
            want = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1:-1]
        checked.append((rebuilt[keep] - want[keep]).abs().max().item())

    _train_one_step_probing(tmp_path, tiny, probe)
    assert len(checked) == 1 and checked[0] < 1e-4


def test_distill_refuses_a_model_whose_logits_are_scaled():
    """The rebuilt logits are lm_head(hidden) / temperature: a model config that scales logits is refused."""
    from types import SimpleNamespace

    from quarl.rl.distill import DistillTerm

    text = SimpleNamespace(final_logit_softcapping=30.0)
    lm = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=lm)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        DistillTerm(1.0, "forward").install(trainer, lambda h: None)
    with pytest.raises(ValueError, match="divergence"):
        DistillTerm(1.0, "js")
