"""`quarl train` on the shipped testbed: phases, frozen base, AQN telemetry, mismatch, run directory, strictness."""

import json

import pytest
import torch
import yaml

from quarl.rl import load_config, train
from quarl.runs import RunExistsError, RunFinishedError, read_metrics, run_status


def _base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_base_frozen_adapters_trained_injection_on_base_layer(tmp_path, tiny):
    from quarl.rl.run import _build

    cfg = load_config("injection: {scheme: MXFP4}\naqn: {schedule: constant, sigma_start: 0.01}\n", tiny)
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, model = _build(cfg, tmp_path, 0)
    base = _base_params(model)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    recorder.close()
    after = dict(model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "base weights changed during training"
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "LoRA adapters did not train"
    mods = attached.injector.modules
    assert len(mods) == 6 * 7 and all(m.endswith("base_layer") for m in mods) and not any("lora_" in m for m in mods)
    stats = attached.injector.stats()
    assert all(s["fires"].get("rollout", 0) > 0 and s["fires"].get("training", 0) > 0 for s in stats.values())
    assert attached.aqn.applications == 2  # once per optimizer step, in the rollout only
    rows = [r for r in read_metrics(tmp_path) if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["aqn/sigma"] == 0.01 and r["aqn/modules"] == 13 and r["aqn/noise_norm"] > 0
        assert r["mismatch/kl"] > 0  # AQN perturbs the rollout only: the training-phase log-probs differ
        assert {"reward/mean", "loss", "grad_norm", "time/s_per_step", "rollout/degenerate_rate"} <= set(r)
    assert "val/acc_strict" in rows[-1]  # the final step is always validated


def test_rollout_only_injection_skips_training_forwards(tmp_path, tiny):
    from quarl.rl.run import _build

    cfg = load_config("injection: {scheme: MXFP4, apply_during: rollout}\ngrpo: {tis_cap: 1.5}\n",
                      tiny + ["grpo.steps=1"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, _ = _build(cfg, tmp_path, 0)
    trainer.train()
    recorder.close()
    stats = attached.injector.stats().values()
    assert all(s["fires"].get("rollout", 0) > 0 and s["fires"].get("training", 0) == 0 for s in stats)
    assert all(s["skipped"].get("training", 0) > 0 for s in stats)
    row = read_metrics(tmp_path)[-1]
    assert row["mismatch/kl"] > 1e-4 and row["mismatch/ratio_max"] > 1.0  # quantized rollout vs fp32 training
    assert 0 < row["tis/weight_mean"] <= 1.5


def test_without_injection_rollout_and_training_logps_agree(tmp_path, tiny):
    from quarl.rl.run import _build

    cfg = load_config(None, tiny + ["grpo.steps=1"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, _ = _build(cfg, tmp_path, 0)
    trainer.train()
    recorder.close()
    row = read_metrics(tmp_path)[-1]
    assert attached.injector is None
    assert row["mismatch/kl"] < 1e-6 and abs(row["mismatch/ratio_max"] - 1) < 1e-3  # same model, same tokens


def test_run_directory_is_complete_and_immutable(tmp_path, tiny):
    out = tmp_path / "run"
    run_dir = train("injection: {scheme: NVFP4}\n", tiny, out)
    assert run_dir == out and run_status(out).value == "finished"
    for name in ("config.yaml", "env.json", "metrics.jsonl", "train.log", "run.json", "exit.json"):
        assert (out / name).exists(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert (out / "checkpoints" / "checkpoint-2" / "quarl_complete").exists()
    assert json.loads((out / "env.json").read_text())["trl"].startswith("1.16")
    resolved = load_config(out / "config.yaml")
    assert resolved.injection.error_type == "nvfp4" and resolved.grpo.steps == 2
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    vals = [r for r in rows if "val/acc_strict" in r]
    assert [r["step"] for r in vals] == [0, 2]  # step 0 and the final step (eval.every=10 > steps)
    for r in vals:
        assert r["val/n"] == 8 and r["val/acc_strict_lo"] <= r["val/acc_strict"] <= r["val/acc_strict_hi"]
        assert r["val/quant_modules"] == 42 and r["val/quant_fires"] > 0  # the declared quantization was applied
        assert any(k.startswith("val-core/") and k.endswith("/acc/mean@1") for k in r)
        ids = [json.loads(x)["id"] for x in (out / "eval" / f"step-{r['step']}.jsonl").read_text().splitlines()]
        assert len(ids) == 8
    with pytest.raises(RunExistsError):
        train("injection: {scheme: NVFP4}\n", tiny, out)
    with pytest.raises(RunFinishedError):
        train(resume=out)


def test_train_leaves_process_wide_state_alone(tmp_path, tiny, monkeypatch):
    """Environment (no HF_HUB_OFFLINE needed: nothing is downloaded), warning filters, logger levels and handlers,
    and torch's thread count (run.threads) are the same after train() as before; the CLI owns them."""
    import logging
    import os
    import warnings

    import quarl.rl.engine  # noqa: F401  (TRL's import-time registrations happen before the snapshot)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    loggers = [logging.getLogger(n) for n in ("", "quarl", "trl", "transformers.trainer")]

    def snapshot():
        return (dict(os.environ), list(warnings.filters), [(lg.level, list(lg.handlers)) for lg in loggers],
                [h.level for h in logging.getLogger().handlers], torch.get_num_threads())

    before = snapshot()
    threads = 2 if before[-1] != 2 else 3
    train(None, tiny + ["grpo.steps=1", "run.checkpoint_every=0", f"run.threads={threads}"], tmp_path / "r")
    after = snapshot()
    for what, a, b in zip(("environment", "warning filters", "loggers", "root handler levels", "threads"), before,
                          after):
        assert a == b, f"train() changed the process-wide {what}"
    assert (tmp_path / "r" / "train.log").exists()


def test_default_run_id_and_unknown_set_key(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
        train(None, tiny + ["grpo.max_new_token=3"])
    assert not (tmp_path / "runs").exists()  # nothing created for an invalid config
    run_dir = train(None, tiny + ["grpo.steps=1", "run.name=E0"])
    assert run_dir.parent.name == "runs" and run_dir.name.startswith("E0-") and run_dir.name.endswith("-s0")


def test_aqn_matching_nothing_fails_before_step_1(tmp_path, tiny):
    with pytest.raises(ValueError, match="matches zero modules"):
        train("aqn: {target_classes: [Qwen2RMSNorm]}\n", tiny, tmp_path / "r")
    assert run_status(tmp_path / "r").value == "failed"
    assert not [r for r in read_metrics(tmp_path / "r") if r.get("step", 0) >= 1]


def test_aqn_that_never_fires_fails_at_setup(tmp_path, tiny):
    with pytest.raises(ValueError, match="sigma is 0 on every step"):
        train("aqn: {enabled: true}\n", tiny + ["grpo.steps=1"], tmp_path / "r")  # qerl stage 0 covers the run


def test_training_prompts_tokenize_exactly_like_evaluation():
    from quarl.data.sources import load_source
    from quarl.eval.harness import build_prompt
    from quarl.models import load_model
    from quarl.rl.run import _prompts

    _, tok = load_model("testbed:tiny")
    problems = load_source("synthetic", 5, "train")
    for row, p in zip(_prompts(tok, problems), problems):
        trl_ids = tok.apply_chat_template([row["prompt"]], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"][0]
        eval_ids = tok(build_prompt(tok, p.question), add_special_tokens=False)["input_ids"]
        assert list(trl_ids) == eval_ids and row["ground_truth"] == p.ground_truth


def test_resolved_config_yaml_reloads(tmp_path, tiny):
    cfg = load_config("injection: {scheme: MXFP4, use_ste: false}\n", tiny)
    text = cfg.to_yaml()
    assert load_config(yaml.safe_load(text)) == cfg


def test_train_on_a_pre_quantized_checkpoint(tmp_path, tiny):
    """The QeRL path: the base quantized once (NVFP4A16 compressed-tensors), frozen; LoRA trains on top; AQN works."""
    from quarl.checkpoint import CompressedLinear, export_checkpoint, get_scheme
    from quarl.models import load_model
    from quarl.rl.run import _build

    model, tok = load_model("testbed:tiny")
    ckpt = tmp_path / "ckpt"
    export_checkpoint(model, tok, get_scheme("NVFP4A16"), ckpt, progress=False)
    cfg = load_config(f"model: {{name: {ckpt}}}\naqn: {{schedule: constant, sigma_start: 0.01}}\n",
                      tiny + ["grpo.steps=1"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, peft_model = _build(cfg, tmp_path, 0)
    packed = {n: b.clone() for n, b in peft_model.named_buffers() if "weight_packed" in n}
    wrapped = [m for m in peft_model.modules() if isinstance(getattr(m, "base_layer", None), CompressedLinear)]
    assert len(wrapped) == 42 and packed
    trainer.train()
    recorder.close()
    assert all(torch.equal(b, dict(peft_model.named_buffers())[n]) for n, b in packed.items())
    assert attached.aqn.applications == 1
    with pytest.raises(ValueError, match="pre-quantized checkpoint"):
        _build(load_config(f"model: {{name: {ckpt}}}\ninjection: {{scheme: MXFP4}}\n", tiny), tmp_path, 0)


def test_gradient_checkpointing_gives_the_same_ste_gradient_and_fire_counts(tmp_path, tiny):
    """GC is off by default; turned on, the recompute during backward must neither change the STE gradient nor
    count as another fire (one fire per logical forward)."""
    from quarl.rl.run import _build

    results = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        out.mkdir()
        (out / "metrics.jsonl").touch()
        cfg = load_config("injection: {scheme: MXFP4}\n", tiny + ["grpo.steps=1", f"grpo.gradient_checkpointing={gc}"])
        trainer, recorder, attached, model = _build(cfg, out, 0)
        recomputes = []
        q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer")
        q_proj.register_forward_pre_hook(lambda m, a: recomputes.append(torch._C._current_graph_task_id() != -1))
        trainer.train()
        recorder.close()
        assert any(recomputes) == gc  # the checkpoint recompute really ran inside backward (and only with GC)
        fires = {k: v["fires"].get("training", 0) for k, v in attached.injector.stats().items()}
        grads = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        results.append((read_metrics(out)[-1], fires, grads))
    (row0, fires0, lora0), (row1, fires1, lora1) = results
    assert row1["loss"] == pytest.approx(row0["loss"], rel=1e-6, abs=1e-12)
    assert row1["grad_norm"] == pytest.approx(row0["grad_norm"], rel=1e-5)
    assert all(torch.allclose(lora0[n], lora1[n], rtol=1e-5, atol=1e-7) for n in lora0)  # same update
    assert fires1 == fires0


def test_aqn_during_both_phases_noises_the_training_forwards_too(tmp_path, tiny):
    from quarl.rl.run import _build

    cfg = load_config("aqn: {schedule: constant, sigma_start: 0.05, apply_during: both}\n", tiny + ["grpo.steps=1"])
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, model = _build(cfg, tmp_path, 0)
    norm = model.get_submodule("base_model.model.model.norm").weight
    clean = norm.detach().clone()
    seen = []
    model.get_submodule("base_model.model.model.norm").register_forward_pre_hook(
        lambda m, a: seen.append((model.training, torch.equal(m.weight, clean))))
    trainer.train()
    recorder.close()
    in_step = [is_clean for training, is_clean in seen if training]  # generation, log-prob and loss forwards
    in_val = [is_clean for training, is_clean in seen if not training]  # the final validation (eval mode)
    assert in_step and not any(in_step) and in_val and all(in_val)
    assert torch.equal(norm, clean)
    row = read_metrics(tmp_path)[-1]
    assert row["mismatch/kl"] < 1e-6  # rollout and training saw the same noise: no mismatch
    assert attached.aqn.applications == 1


def _one_step(tmp_path, tiny, text):
    from quarl.rl.run import _build

    cfg = load_config(text, tiny + ["grpo.steps=1"])
    (tmp_path / "metrics.jsonl").touch()
    return _build(cfg, tmp_path, 0)


def test_mismatch_comes_from_the_loss_forward_without_an_extra_pass(tmp_path, tiny):
    """No TIS: one training-phase forward per step (the loss's); with TIS the extra no-grad forward comes back."""
    for tis, forwards in ((None, 1), (1.5, 2)):
        out = tmp_path / f"tis{tis}"
        out.mkdir()
        extra = f"\ngrpo: {{tis_cap: {tis}}}\n" if tis else "\n"
        trainer, recorder, attached, _ = _one_step(out, tiny, "injection: {scheme: MXFP4}\naqn: {sigma_start: 0.01, "
                                                "schedule: constant}" + extra)
        trainer.train()
        recorder.close()
        fires = [s["fires"].get("training", 0) for s in attached.injector.stats().values()]
        assert set(fires) == {forwards}, (tis, set(fires))
        row = read_metrics(out)[-1]
        assert row["mismatch/kl"] > 0 and row["mismatch/ratio_max"] > 1.0


def test_loss_forward_mismatch_equals_a_separate_training_forward(tmp_path, tiny):
    from quarl.rl.health import mismatch_stats
    from quarl.rl.mismatch import training_logps

    trainer, recorder, attached, _ = _one_step(tmp_path, tiny, "injection: {scheme: MXFP4}\n"
                                            "aqn: {sigma_start: 0.01, schedule: constant}\n")
    separate = []
    original = trainer._generate_and_score_completions

    def wrapped(inputs):
        out = original(inputs)
        if trainer.model.training:
            separate.append(mismatch_stats(training_logps(trainer, out), out["sampling_per_token_logps"],
                                           out["completion_mask"], trainer.options.mismatch_cap))
        return out

    trainer._generate_and_score_completions = wrapped
    trainer.train()
    recorder.close()
    row = read_metrics(tmp_path)[-1]
    assert len(separate) == 1 and separate[0]["mismatch/kl"] > 0
    for key, value in separate[0].items():  # same tokens, same phase, same weights (no_grad vs grad only)
        assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_norms_lr_gives_the_norm_gains_their_own_step_size(tmp_path, tiny):
    """Adam's first step moves each parameter by ~lr: 1e-2 for the norm gains, 1e-4 (grpo.lr) for LoRA. (The
    distillation term makes every gradient nonzero even when a tiny batch has no reward variance.)"""
    trainer, recorder, _, model = _one_step(tmp_path, tiny, "injection: {scheme: MXFP4}\ngrpo: {distill: 1.0}\n"
                                            "lora: {trainable_norms: true, norms_lr: 1.0e-2}\n")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    recorder.close()
    groups = [(g["lr"], len(g["params"])) for g in trainer.optimizer.param_groups if g["params"]]
    n_norms = sum(1 for n in before if "modules_to_save" in n)
    assert n_norms == 13 and (1e-2, n_norms) in groups and sum(k for _, k in groups) == len(before)
    after = dict(model.named_parameters())
    step = {kind: max((after[n] - before[n]).abs().max().item() for n in before if kind in n)
            for kind in ("modules_to_save", "lora_B")}
    assert 5e-3 < step["modules_to_save"] < 2e-2 and 0 < step["lora_B"] < 2e-4, step
    with pytest.raises(ValueError, match="needs lora.trainable_norms"):
        load_config(None, ["lora.norms_lr=1.0e-2"])
