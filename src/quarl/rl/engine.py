"""`QuarlGRPOTrainer`: TRL's ``GRPOTrainer`` with quarl's overrides, each a few lines delegating to a quarl module.

TRL 1.16's ``GRPOTrainer`` does the algorithm: group advantages, the grpo / dapo / dr_grpo / bnpo losses, clip-higher,
PEFT, accelerate, checkpoints. quarl overrides the methods below. Every TRL assumption in the table (and each
method's signature) is checked against the installed TRL by ``tests/rl/test_trl_contract.py``: `quarl.rl.trl_contract`
lists them with permalinks into TRL's v1.16.0 source. Each feature is guarded by the tests named under its row
(files under ``tests/rl/``).

+------------------------------------+------------------------------------+--------------------------------------------+
| override                           | feature (quarl.rl module)          | TRL assumption                             |
+====================================+====================================+============================================+
| _generate_single_turn              | phase rollout; rollout-only AQN;   | the only place TRL generates; HF path: one |
|                                    | vLLM weight sync first; the        | model.generate(..., generation_config=...) |
|                                    | sampled tokens' log-probs          | call, no log-probs returned; vLLM path     |
|                                    | (rollout)                          | syncs only when _last_loaded_step differs  |
| guarded by test_train.py::test_base_frozen_adapters_trained_injection_on_base_layer                                  |
| guarded by test_train.py::test_without_injection_rollout_and_training_logps_agree                                    |
+------------------------------------+------------------------------------+--------------------------------------------+
| training_step                      | aqn.apply_during both: the noise   | generation, log-probs, loss and backward   |
|                                    | over the whole step (rollout)      | all run inside one training_step           |
| guarded by test_train.py::test_aqn_during_both_phases_noises_the_training_forwards_too                               |
+------------------------------------+------------------------------------+--------------------------------------------+
| _generate_and_score_completions    | mismatch, TIS, rollout health, AQN | batch keys prompt_ids/mask,                |
|                                    | statistics (mismatch)              | completion_ids/mask, advantages,           |
|                                    |                                    | sampling_per_token_logps,                  |
|                                    |                                    | old_per_token_logps; _metrics['train'];    |
|                                    |                                    | TRL's own IS only with vLLM                |
| guarded by test_train.py::test_rollout_only_injection_skips_training_forwards                                        |
| guarded by test_train.py::test_mismatch_comes_from_the_loss_forward_without_an_extra_pass                            |
+------------------------------------+------------------------------------+--------------------------------------------+
| _compute_loss                      | mismatch from the loss forward     | the first log-prob call inside the loss is |
|                                    | (mismatch); the grpo.distill term  | the policy's; (B, T) advantages accepted;  |
|                                    | (distill)                          | the fused LM head runs model.base_model    |
| guarded by test_train.py::test_loss_forward_mismatch_equals_a_separate_training_forward                              |
| guarded by test_distill.py::test_distill_uses_the_unquantized_teacher_and_the_loss_forwards_logits                   |
| guarded by test_distill.py::test_distill_student_logits_are_the_policys                                              |
+------------------------------------+------------------------------------+--------------------------------------------+
| _get_per_token_logps_and_entropies | grpo.reference unquantized         | the beta-KL reference runs the PEFT model  |
|                                    | (reference); log-prob capture for  | itself, with the 'ref' adapter or with     |
|                                    | the mismatch (mismatch)            | adapters disabled                          |
| guarded by test_reference.py::test_reference_runs_with_or_without_the_injection                                      |
+------------------------------------+------------------------------------+--------------------------------------------+
| log                                | one pooled mismatch/* value per    | TRL averages the _metrics['train'] lists   |
|                                    | logged window (mismatch)           | when it logs                               |
| guarded by test_train.py::test_loss_forward_mismatch_equals_a_separate_training_forward                              |
+------------------------------------+------------------------------------+--------------------------------------------+
| create_optimizer                   | lora.norms_lr: the norm gains' own | HF's Trainer builds its groups with one lr |
|                                    | param group (optim)                |                                            |
| guarded by test_train.py::test_norms_lr_gives_the_norm_gains_their_own_step_size                                     |
+------------------------------------+------------------------------------+--------------------------------------------+
| _save_checkpoint,                  | quarl_state.json, the completion   | checkpoints are                            |
| _load_optimizer_and_scheduler      | marker, the AQN state on resume    | _get_output_dir(trial)/checkpoint-N; the   |
|                                    | (resume)                           | load runs once, on resume                  |
| guarded by test_resume.py::test_killed_and_resumed_run_matches_uninterrupted                                         |
+------------------------------------+------------------------------------+--------------------------------------------+
| (vLLM engine: quarl.rl.vllm)       | injection and AQN on vLLM's model; | VLLMGeneration.sync_weights loads into     |
|                                    | its weight cache invalidated after | ...model_runner.model; TRL builds vllm.LLM |
|                                    | every sync                         | by its module-level name LLM               |
| guarded by test_vllm.py::test_every_weight_sync_invalidates_the_rollout_injector                                     |
| guarded by test_train_vllm_gpu.py::test_vllm_rollouts_are_injected (GPU)                                             |
+------------------------------------+------------------------------------+--------------------------------------------+

`TrainerOptions` (frozen, from the config) are the settings; `Attached` holds the injector / AQN objects and the last
AQN statistics. Only this module and `quarl.rl.vllm` import TRL.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from quarl.rl.distill import DistillTerm
from quarl.rl.mismatch import LossCapture, MismatchPool, add_from_loss, mismatch_from_loss, score_rollouts
from quarl.rl.optim import split_norm_group
from quarl.rl.options import Attached, TrainerOptions
from quarl.rl.reference import is_reference_forward
from quarl.rl.resume import restore_aqn, save_quarl_state
from quarl.rl.rollout import generate_with_logprobs, rollout_context, whole_step_noise
from quarl.rl.trl_contract import check_trl

check_trl()
from trl import GRPOTrainer  # noqa: E402  (after the version check, so a wrong TRL fails with its message)


class QuarlGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with explicit phases, rollout-only AQN, rollout log-probs, mismatch / TIS, a full-precision
    reference or distillation term, a norm-gain lr, and marked checkpoints (see the table above)."""

    def __init__(self, *args: Any, options: TrainerOptions, attached: Attached, **kwargs: Any) -> None:
        self.options, self.attached = options, attached
        self.mismatch, self.capture = MismatchPool(), LossCapture()
        self.distill = DistillTerm(options.distill, options.distill_divergence) if options.distill > 0 else None
        super().__init__(*args, **kwargs)
        if self.distill is not None:
            self.distill.install(self, self.capture.offer_hidden)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        generate = functools.partial(super()._generate_single_turn, prompt_ids, images, multimodal_fields,
                                     num_generations, has_tool_images)
        with rollout_context(self):
            if self.use_vllm:  # vLLM returns the sampled tokens' log-probs itself
                return generate()
            return generate_with_logprobs(self.accelerator.unwrap_model(self.model_wrapped), generate)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with whole_step_noise(self):
            return super().training_step(model, inputs, num_items_in_batch)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            score_rollouts(self, out)
        return out

    def _compute_loss(self, model, inputs):
        mismatch = self.model.training and mismatch_from_loss(inputs, self.options.tis_cap)
        distill = self.distill if self.model.training else None
        if not (mismatch or distill):
            return super()._compute_loss(model, inputs)
        teacher = distill.teacher_logits(self, inputs) if distill else None  # (B, T, V), no grad
        with self.capture.active(hidden=distill is not None) as seen:
            loss = super()._compute_loss(model, inputs)
            logps, hidden = seen.logps, seen.hidden  # closed lists once the capture ends
        if mismatch:
            add_from_loss(self, logps, inputs)
        return loss + distill.loss(self, hidden, teacher, inputs) if distill else loss

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        if self.options.reference_unquantized and is_reference_forward(self.accelerator.unwrap_model(self.model)):
            with self.attached.unquantized():  # the beta-KL reference without the injection
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self.capture.offer_logps(result[0])
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            self.mismatch.flush(self._metrics["train"])
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.options.norms_lr is not None:
            split_norm_group(optimizer, (self.model if model is None else model).named_parameters(),
                             self.options.norms_lr)
        return optimizer

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        save_quarl_state(self, folder, self.attached.aqn)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.attached.aqn is not None:
            restore_aqn(checkpoint, self.attached.aqn)
