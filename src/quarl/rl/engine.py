"""TRL glue (the one engine-specific module; a verl adapter can follow the same seams).

TRL 1.16's ``GRPOTrainer`` does the algorithm: group advantages, the grpo / dapo / dr_grpo / bnpo losses, clip-higher,
PEFT, accelerate, checkpoints. It lacks eight things quarl needs, added here by overriding nine methods
(TRL_NOTES.md §1-4; line numbers refer to trl 1.16.0 ``trainer/grpo_trainer.py``):

1. Explicit phases. ``module.training`` is True during TRL's generation, so it cannot be the signal. The injector is
   kept in phase ``training``; ``_generate_single_turn`` (the only place TRL generates, G:1763) switches it to
   ``rollout`` for the duration of generation.
2. AQN in the rollout only: the same override enters ``AQN.noised(global_step)`` around generation in train mode;
   the clean gains are restored by copy before TRL's log-prob forwards and the loss.
3. Rollout-phase log-probs: TRL returns ``logprobs=None`` on the HF path (G:1889), so ``generate`` is wrapped for the
   call to also return the (temperature-scaled) scores, and the sampled tokens' log-probs are returned to TRL, which
   pads them into ``sampling_per_token_logps``.
4. Mismatch, TIS and rollout health. The training-phase log-probs of the sampled tokens come from the loss forward
   itself (``_compute_loss`` captures them, detached: no extra pass), or from TRL's ``old_per_token_logps`` when it
   computes them (num_iterations > 1, vLLM). Only ``tis_cap`` needs them before the loss: then one extra no-grad
   forward (phase ``training``) runs in ``_generate_and_score_completions``, which multiplies each token's advantage
   by the detached truncated ratio (TRL's own IS is gated on ``use_vllm``, G:2660/3146). ``mismatch/*`` and
   ``rollout/*`` are pooled over every rank's tokens and completions.
5. Resumable quarl state: ``_save_checkpoint`` adds ``quarl_state.json`` and, after every rank finished writing, a
   ``quarl_complete`` marker -- TRL's ``get_last_checkpoint`` would return a half-written directory after SIGKILL.
6. A full-precision KL reference (``grpo.reference: unquantized``): TRL's beta-KL reference is the base without
   adapters (G:2710-2737), i.e. still under the injection; ``_get_per_token_logps_and_entropies`` recognises that
   forward (the "ref" adapter active, or adapters disabled) and runs it with the injector bypassed.
7. Distillation from the unquantized base (``grpo.distill``, ``quarl.rl.distill``): ``_compute_loss`` runs one no-grad
   forward of the base without adapters or injection, rebuilds the policy's logits from the loss forward's hidden
   states (a backbone hook), and adds ``distill * KL`` over the full next-token distributions to TRL's loss.
8. A separate lr for the trainable norm gains (``lora.norms_lr``): ``create_optimizer`` moves them into their own
   param group (HF's Trainer builds groups by weight decay only).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from importlib import metadata
from typing import Any

import torch
from packaging.version import Version

from quarl.rl.distill import distill_kl
from quarl.rl.health import mismatch_from_sums, mismatch_sums, pool_sums, rollout_health, tis_weights

logger = logging.getLogger(__name__)
TRL_MIN, TRL_MAX = "1.16", "1.17"  # tested range: trl>=1.16,<1.17
COMPLETE_MARKER = "quarl_complete"


def check_trl() -> str:
    """The installed TRL version; ImportError with the fix when TRL is missing or outside the tested range."""
    try:
        version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise ImportError("quarl train needs TRL: pip install -e '.[train]' (trl>=1.16,<1.17)") from None
    if not Version(TRL_MIN) <= Version(version) < Version(TRL_MAX):
        raise ImportError(f"quarl train is built on trl>={TRL_MIN},<{TRL_MAX} (it overrides TRL internals); found "
                          f"trl {version}. Install the tested range: pip install 'trl>={TRL_MIN},<{TRL_MAX}'")
    return version


check_trl()
from trl import GRPOTrainer  # noqa: E402  (after the version check, so a wrong TRL fails with the message above)


class RolloutHooks:
    """What quarl adds to a trainer: the injector(s), AQN, and the knobs of the mismatch / TIS / health metrics."""

    def __init__(self, injector: Any = None, aqn: Any = None, tis_cap: float | None = None,
                 mismatch_cap: float = 2.0, reference_unquantized: bool = False, distill: float = 0.0,
                 distill_divergence: str = "forward", norms_lr: float | None = None) -> None:
        self.injector = injector
        self.norms_lr = norms_lr  # lr of the trainable RMSNorm gains (PEFT modules_to_save), None = the run's lr
        self.reference_unquantized = reference_unquantized  # the beta-KL reference runs without the injection
        self.distill = distill  # weight of the full-distribution KL to the unquantized base (0 = off)
        self.distill_divergence = distill_divergence
        self.aqn = aqn
        self.tis_cap = tis_cap
        self.mismatch_cap = mismatch_cap
        self.aqn_stats: dict[str, Any] = {}
        self.vllm_injector: Any = None  # grpo.use_vllm: the injection and AQN attached to vLLM's model
        self.vllm_aqn: Any = None

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        return self.injector.phase(name) if self.injector is not None else contextlib.nullcontext()

    def unquantized(self) -> contextlib.AbstractContextManager:
        return self.injector.bypassed() if self.injector is not None else contextlib.nullcontext()


def _record_scores(model: Any, sink: list) -> None:
    """Wrap ``model.generate`` (instance attribute) to also return the processed scores into ``sink``."""
    original = model.generate

    def generate(*args: Any, **kwargs: Any) -> torch.Tensor:
        config = copy.deepcopy(kwargs.pop("generation_config"))
        config.return_dict_in_generate, config.output_scores = True, True
        out = original(*args, **kwargs, generation_config=config)
        sink.append(out.scores)  # tuple of N tensors (B, V): logits after temperature = the sampling distribution
        return out.sequences

    model.generate = generate


def _sampled_logprobs(scores: tuple, completion_ids: list[list[int]]) -> list[list[float]]:
    logp = torch.log_softmax(torch.stack(scores, dim=1).float(), dim=-1)  # (B, N, V)
    out = []
    for i, ids in enumerate(completion_ids):
        idx = torch.tensor(ids, dtype=torch.long, device=logp.device)  # (n_i,)
        out.append(logp[i, : len(ids)].gather(-1, idx[:, None]).squeeze(-1).tolist())
    return out


class QuarlGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with explicit phases, rollout-only AQN, rollout log-probs, mismatch / TIS and marked checkpoints."""

    def __init__(self, *args: Any, quarl: RolloutHooks, **kwargs: Any) -> None:
        self.quarl = quarl
        self._logps_sink: list[torch.Tensor] | None = None  # set inside _compute_loss: captures the loss's log-probs
        self._mismatch_acc: torch.Tensor | None = None  # (5,) mismatch sums pooled until the next log
        self._hidden_sink: list[torch.Tensor] | None = None  # grpo.distill: the loss forward's last hidden states
        super().__init__(*args, **kwargs)
        if quarl.distill > 0:
            self._capture_hidden_states()

    # --- generation: phase rollout, AQN, log-probs -------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        hooks = self.quarl
        with contextlib.ExitStack() as stack:
            stack.enter_context(hooks.phase("rollout"))
            if self.use_vllm and self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()  # sync first (as TRL would), so the AQN noise survives it
                self._last_loaded_step = self.state.global_step
            aqn = hooks.vllm_aqn if self.use_vllm else hooks.aqn
            rollout_only = aqn is not None and (self.use_vllm or aqn.cfg.apply_during == "rollout")
            if rollout_only and self.model.training:  # training rollouts only, never evaluation
                hooks.aqn_stats = stack.enter_context(aqn.noised(self.state.global_step))
            if self.use_vllm:  # vLLM returns the sampled tokens' log-probs itself
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            model = self.accelerator.unwrap_model(self.model_wrapped)
            scores: list = []
            _record_scores(model, scores)
            try:
                ids, _ = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                       has_tool_images)
            finally:
                del model.generate
        return ids, _sampled_logprobs(scores[0], ids)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """With ``aqn.apply_during: both`` the noise covers the whole step (generation, log-probs, loss, backward);
        the clean weights are back before the optimizer step and before validation."""
        aqn = self.quarl.aqn
        if aqn is None or self.use_vllm or aqn.cfg.apply_during != "both":
            return super().training_step(model, inputs, num_items_in_batch)
        with aqn.noised(self.state.global_step) as stats:
            self.quarl.aqn_stats = stats
            return super().training_step(model, inputs, num_items_in_batch)

    # --- mismatch, TIS, health --------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        metrics = self._metrics["train"]
        mask = out["completion_mask"]  # (B, T)
        rollout_lp = out.get("sampling_per_token_logps")  # (B, T) or None
        if rollout_lp is not None and not self._mismatch_from_loss(out):
            train_lp = out.get("old_per_token_logps")  # TRL computed it (num_iterations > 1, vLLM): reuse it
            if train_lp is None:  # TIS needs the ratio before the loss: one extra no-grad forward
                train_lp = self._training_logps(out)
            cap = self.quarl.tis_cap or self.quarl.mismatch_cap
            self._pool_mismatch(mismatch_sums(train_lp, rollout_lp, mask, cap))
            if self.quarl.tis_cap is not None and not self.use_vllm:  # with vLLM, TRL's token_truncate IS
                w = tis_weights(train_lp, rollout_lp, mask, self.quarl.tis_cap)  # (B, T)
                adv = out["advantages"]
                out["advantages"] = (adv.unsqueeze(1) if adv.dim() == 1 else adv) * w  # (B, T)
                n = self.accelerator.gather(torch.stack([w[mask.bool()].sum(), mask.sum()]).double()[None]).sum(0)
                metrics["tis/weight_mean"].append(float(n[0] / n[1]) if n[1] > 0 else 1.0)
        eos = set(self.eos_token_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], mask)]
        finished = [bool(r) and r[-1] in eos for r in rows]
        health = rollout_health(rows, finished)  # rates over this rank's completions, weighted by their count
        counts = torch.tensor([[v * len(rows) for v in health.values()] + [len(rows)]], dtype=torch.float64,
                              device=mask.device)
        counts = self.accelerator.gather(counts).sum(0)  # (K+1,): every rank's completions
        for i, key in enumerate(health):
            metrics[key].append(float(counts[i] / counts[-1]))
        for key, value in self.quarl.aqn_stats.items():
            metrics[key].append(float(value))
        return out

    def _compute_loss(self, model, inputs):
        """Without TIS and without TRL's old log-probs, the mismatch comes from the loss forward itself (the
        training-phase log-probs of the same tokens, detached): no extra forward pass per step. With
        ``grpo.distill`` the same forward's hidden states give the policy's logits for the distillation term."""
        mismatch = self.model.training and self._mismatch_from_loss(inputs)
        distill = self.model.training and self.quarl.distill > 0
        if not (mismatch or distill):
            return super()._compute_loss(model, inputs)
        teacher = self._teacher_logits(inputs) if distill else None  # (B, T, V), no grad
        self._logps_sink, self._hidden_sink = [], ([] if distill else None)
        try:
            loss = super()._compute_loss(model, inputs)
            captured, hidden = self._logps_sink, self._hidden_sink
        finally:
            self._logps_sink = self._hidden_sink = None
        if mismatch:
            self._pool_mismatch(mismatch_sums(captured[0], inputs["sampling_per_token_logps"],
                                              inputs["completion_mask"], self.quarl.mismatch_cap))
        if distill:
            if not hidden:
                raise RuntimeError("grpo.distill: the loss forward did not pass through the backbone hook (model."
                                   "base_model); this architecture's fused LM head is not supported")
            loss = loss + self.quarl.distill * self._distill_loss(torch.cat(hidden), teacher, inputs)
        return loss

    # --- distillation from the unquantized base (grpo.distill) ------------------------------------------------------
    def _causal_lm(self) -> Any:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _capture_hidden_states(self) -> None:
        """A forward hook on the backbone keeps the loss forward's last hidden states: TRL's fused LM head (U:1548)
        never materialises logits, so the policy's logits are rebuilt from them (one extra LM-head matmul)."""
        lm = self._causal_lm()
        text = lm.config.get_text_config()
        scaled = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                              "logits_scaling") if getattr(text, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise ValueError(f"grpo.distill rebuilds logits as lm_head(hidden) / temperature; this model also applies "
                             f"{', '.join(scaled)}, which it does not reproduce")

        def keep(module: Any, args: Any, output: Any) -> None:
            if self._hidden_sink is not None:
                self._hidden_sink.append(output.last_hidden_state)  # (B, P+T, H), with grad

        lm.base_model.register_forward_hook(keep)

    @torch.no_grad()
    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        """(B, T, V) next-token logits of the unquantized base (adapters off, injection bypassed) / temperature."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P+T)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        t = inputs["completion_ids"].size(1)
        model = self.accelerator.unwrap_model(self.model)
        with self.quarl.unquantized(), model.disable_adapter():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=t + 1).logits  # (B, T+1, V)
        return logits[:, :-1] / self.temperature

    def _distill_loss(self, hidden: torch.Tensor, teacher: torch.Tensor, inputs: dict) -> torch.Tensor:
        t = inputs["completion_ids"].size(1)
        head = self._causal_lm().get_output_embeddings()
        student = torch.nn.functional.linear(hidden[:, -t - 1:-1], head.weight, head.bias) / self.temperature
        mask = inputs["completion_mask"]
        loss, per_token = distill_kl(student, teacher, mask, self.quarl.distill_divergence)
        n = self.accelerator.gather(torch.stack([(per_token * mask).sum(), mask.sum()]).double()[None]).sum(0)
        self._metrics["train"]["distill/kl"].append(float(n[0] / n[1]) if n[1] > 0 else 0.0)
        return loss

    def _mismatch_from_loss(self, batch: dict) -> bool:
        """Whether the loss forward supplies the mismatch's training-phase log-probs (the one place that decides
        between it and ``_generate_and_score_completions``): rollout log-probs, no TIS, no TRL old log-probs."""
        return (batch.get("sampling_per_token_logps") is not None and self.quarl.tis_cap is None
                and batch.get("old_per_token_logps") is None)

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        if self.quarl.reference_unquantized and self._reference_forward():
            with self.quarl.unquantized():  # grpo.reference=unquantized: KL to the base without injection
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        sink = self._logps_sink
        if sink is not None and not sink:  # inside _compute_loss: the first call is the policy's log-probs
            sink.append(result[0].detach())  # (B, T)
        return result

    def _reference_forward(self) -> bool:
        """Whether the coming forward is TRL's beta-KL reference (G:2710-2737): the model is PEFT-wrapped by quarl, so
        TRL runs it with its zero-initialised "ref" adapter active, or (peft#3340 path) with adapters disabled."""
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model, "active_adapter", None) == "ref":
            return True
        from peft.tuners.tuners_utils import BaseTunerLayer

        layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
        return layer is not None and layer.disable_adapters

    def _pool_mismatch(self, sums: torch.Tensor) -> None:
        """Pool (5,) mismatch sums over ranks now and over micro-batches until the next ``log``."""
        gathered = self.accelerator.gather(sums[None])  # (world, 5)
        if self._mismatch_acc is not None:
            gathered = torch.cat([gathered, self._mismatch_acc[None]])
        self._mismatch_acc = pool_sums(gathered)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        acc = self._mismatch_acc
        if acc is not None and self.model.training:  # one value per logged window, pooled over its tokens
            for key, value in mismatch_from_sums(acc).items():
                self._metrics["train"][key].append(value)
            self._mismatch_acc = None
        super().log(logs, start_time)

    @torch.no_grad()
    def _training_logps(self, out: dict) -> torch.Tensor:
        """Training-phase log-probs of the sampled tokens (the same computation as the loss, without grad)."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)  # (B, P+T)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)  # (B, P+T)
        with self.quarl.phase("training"):
            logps, *_ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size)
        return logps  # (B, T)

    # --- optimizer ------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """``lora.norms_lr``: the trainable norm gains (PEFT ``modules_to_save`` copies) get their own param group,
        so the LR scheduler scales both alike; HF's Trainer has a single lr for every parameter."""
        optimizer = super().create_optimizer(model)
        lr = self.quarl.norms_lr
        if lr is None:
            return optimizer
        names = {id(p): n for n, p in (self.model if model is None else model).named_parameters()}
        for group in list(optimizer.param_groups):
            norms = [p for p in group["params"] if "modules_to_save" in names.get(id(p), "")]
            if norms:
                group["params"] = [p for p in group["params"] if all(p is not q for q in norms)]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": norms,
                                           "lr": lr})
        return optimizer

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            aqn = self.quarl.aqn
            state = {"global_step": self.state.global_step,
                     "aqn": None if aqn is None else {"step": self.state.global_step, "applications": aqn.applications,
                                                      "sigma": aqn.sigma(self.state.global_step)},
                     "prompts_consumed": self.state.global_step * self.args.generation_batch_size
                     // self.num_generations}
            with open(os.path.join(folder, "quarl_state.json"), "w") as f:
                json.dump(state, f)
        self.accelerator.wait_for_everyone()  # every rank's rng_state_{rank}.pth is on disk
        if self.args.should_save:
            with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
                f.write("ok\n")

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.quarl.aqn is not None:
            path = os.path.join(checkpoint, "quarl_state.json")
            if os.path.exists(path):
                with open(path) as f:
                    self.quarl.aqn.applications = (json.load(f).get("aqn") or {}).get("applications", 0)
