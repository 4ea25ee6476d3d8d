"""`grpo.reference`: the beta-KL reference is TRL's (the injected base) or the base without injection (a teacher)."""

import pytest
import torch

from quarl.models import load_model
from quarl.rl import load_config
from quarl.runs import read_metrics

W4A4 = "injection: {scheme: MXFP4}\n"


def _run_one_step(tmp_path, tiny, reference):
    """One step with beta 0.1; returns (attached, the ref log-probs TRL used, the batch, the trainer, the last row)."""
    from quarl.rl.run import _build

    cfg = load_config(W4A4, tiny + ["grpo.steps=1", "grpo.beta=0.1", f"grpo.reference={reference}"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, _ = _build(cfg, tmp_path, 0)
    batches = []
    original = trainer._generate_and_score_completions

    def wrapped(inputs):
        out = original(inputs)
        if trainer.model.training:
            batches.append(out)
        return out

    trainer._generate_and_score_completions = wrapped
    trainer.train()
    recorder.close()
    assert len(batches) == 1
    return attached, batches[0], trainer, read_metrics(tmp_path)[-1]


def _plain_logps(model, out):
    """Log-probs (T 1.0) of the sampled tokens under a plain HF ``model``: no hooks, no TRL, no quarl."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)  # (B, P+T)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    t = out["completion_ids"].size(1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -t - 1:-1].float()  # (B, T, V)
    return torch.log_softmax(logits, -1).gather(-1, out["completion_ids"][..., None]).squeeze(-1)


@pytest.mark.parametrize("reference", ["unquantized", "injected"])
def test_reference_runs_with_or_without_the_injection(tmp_path, tiny, reference):
    attached, out, trainer, row = _run_one_step(tmp_path, tiny, reference)
    stats = attached.injector.stats().values()
    fp32, _ = load_model("testbed:tiny")  # the same shipped weights, never injected
    fp32.eval()
    mask = out["completion_mask"].bool()
    ref = out["ref_per_token_logps"][mask]
    want = _plain_logps(fp32, out)[mask]
    if reference == "unquantized":
        assert all(s["skipped"].get("bypassed", 0) == 1 for s in stats)  # the reference forward, once per module
        assert all(s["fires"]["training"] == 1 for s in stats)  # the loss forward only: the reference never fires
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
        assert row["kl"] > 1e-4  # the W4A4 policy vs the full-precision base: the distance the KL term closes
    else:
        assert all(s["skipped"].get("bypassed", 0) == 0 for s in stats)
        assert all(s["fires"]["training"] == 2 for s in stats)  # TRL's reference forward is injected
        assert (ref - want).abs().max() > 1e-3  # quantized reference, not the fp32 one
        assert row["kl"] < 1e-6  # step 1: the policy is still its reference (LoRA B = 0)


@pytest.mark.parametrize("extra, match", [
    (["grpo.reference=unquantized"], "needs grpo.beta > 0"),
    (["grpo.reference=fp32"], "grpo.reference"),
    (["grpo.beta=0.1", "grpo.reference=unquantized", "aqn.enabled=true", "aqn.apply_during=both"],
     "carry the AQN noise"),
])
def test_reference_config_errors(extra, match):
    with pytest.raises(ValueError, match=match):
        load_config(W4A4, extra)
    with pytest.raises(ValueError, match="injection absent"):
        load_config(None, ["grpo.beta=0.1", "grpo.reference=unquantized"])
