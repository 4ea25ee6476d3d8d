"""quarl's vLLM worker extension against verl 0.9.1's real ``vLLMColocateWorkerExtension`` (vLLM stubbed at import).

Run: nox -s verl   (or, inside that environment: pytest tests/verl/test_verl_rollout.py)

The scenario (tests/verl/_rollout_run.py, in a spawned process so that the vLLM stand-in never reaches other tests):
attach at ``monkey_patch_model``, a bucketed full sync through verl's ``update_weights_from_ipc`` /
``_update_weights``, a LoRA-only sync, validation, a second full sync, the refusals.
"""

import pytest

pytest.importorskip("verl.workers")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import _rollout_run  # noqa: E402

SPEC = """quarl:
  injection: {scheme: MXFP4}
  aqn: {schedule: linear, sigma_start: 0.05, sigma_end: 0.01}
  total_steps: 10
"""


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    work = tmp_path_factory.mktemp("verl_rollout")
    (work / "quarl.yaml").write_text(SPEC)
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setenv("QUARL_VERL_CONFIG", str(work / "quarl.yaml"))
        mpatch.setenv("QUARL_VERIFY_WEIGHT_CACHE", "1")  # a stale cached weight raises instead of passing
        mp.start_processes(_rollout_run.main, args=(str(work / "out.pt"),), nprocs=1, join=True,
                           start_method="spawn")
    return torch.load(work / "out.pt", weights_only=False)


def test_cuda_graphs_are_refused_with_the_fix(out):
    assert "actor_rollout_ref.rollout.enforce_eager=True" in out["eager_error"]


def test_injection_on_vllm_linears_and_aqn_on_vllm_rmsnorm(out):
    assert len(out["injected"]) == 8 and all(m.endswith("_proj") for m in out["injected"])  # never lm_head
    assert out["aqn_modules"] == [f"model.layers.{i}.{n}" for i in (0, 1)
                                  for n in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]


def test_sync_invalidates_the_cache_and_noises_with_the_steps_sigma(out):
    assert out["step_after_sync0"] == 0 and out["step_after_sync1"] == 1
    assert out["sync0_equal_reference"]  # = a fresh model loaded with the synced weights, quantized, AQN step 0
    assert out["sync2_equal_reference"]  # new base weights reach the quantized forward (no stale cache)


def test_lora_only_sync_refreshes_the_noise_from_clean_weights(out):
    assert out["lora_synced"] == 1
    clean, n0, n1 = out["clean_norms_w1"], out["noised_norms_0"], out["noised_norms_1"]
    assert not torch.equal(n0, clean) and not torch.equal(n1, clean) and not torch.equal(n0, n1)
    assert out["sync1_equal_reference"]  # step 1's noise on the clean weights, not on step 0's noise


def test_validation_runs_without_aqn(out):
    assert torch.equal(out["validation_norms"], out["clean_norms_w1"]) and out["validation_equal_clean"]
    assert torch.equal(out["after_validation_norms"], out["noised_norms_1"])
    stats = out["stats"]
    assert stats["quarl/rollout/fires"] > 0 and stats["quarl/rollout/aqn_modules"] == 5
    assert stats["quarl/rollout/aqn_sigma"] == pytest.approx(0.05 - 0.04 / 9)  # linear, step 1 of 10


def test_hooks_that_never_fired_and_delta_sync_fail_loudly(out):
    assert "never ran their hooks" in out["never_fired_error"]
    assert "enforce_eager=True" in out["never_fired_error"]
    assert "delta weight transfer" in out["delta_error"]


def test_the_trainers_step_redraws_the_noise(out):
    assert out["step_after_set"] == 5 and out["set_step_equal_reference"] and out["reset_step_equal_sync1"]
