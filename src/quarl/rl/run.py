"""`train`: one GRPO + LoRA run over the (optionally quantized) model, recorded in an immutable run directory.

    run_dir = train("my.yaml", ["grpo.steps=50"])   # my.yaml: e.g. `quarl train --example`; runs/<name>-<hash>-s<seed>/
    train(resume=run_dir)                                   # continue after a kill (SIGKILL too)

Order of construction (each step depends on the ones before it): seed -> model -> PEFT LoRA (the base frozen) ->
injector on the PEFT model (so it sits on ``base_layer``; adapters are never quantized) -> AQN (zero matched modules
or an always-zero schedule raise here, before step 1) -> data -> TRL config -> `QuarlGRPOTrainer` (`TrainerOptions`
from the config, the `Attached` injector and AQN) -> step-0 validation -> ``trainer.train``. The run directory holds
``config.yaml`` (resolved), ``env.json`` (versions, git), ``metrics.jsonl``, ``tb/``, ``eval/step-N.jsonl``,
``checkpoints/``, ``train.log`` and the registry's ``run.json`` / ``heartbeat.json`` / ``exit.json``.

`train` leaves process-wide state alone: environment variables (offline mode), warning filters and logger levels are
the caller's (``quarl train`` sets them; `quarl.cli.train.process_settings`). ``train.log`` receives the records the
``quarl``, ``transformers.trainer`` and ``trl`` loggers let through at INFO and above; ``torch``'s thread count
(``run.threads``) is restored when the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from quarl.data.sources import load_source
from quarl.eval.gsm8k import extract_answer, gsm8k_reward
from quarl.eval.harness import build_prompt
from quarl.eval.results import environment
from quarl.inject import attach
from quarl.inject.spec import Phase
from quarl.models import load_model
from quarl.noise import AQN
from quarl.rl.config import TrainConfig, load_config
from quarl.rl.resume import last_checkpoint
from quarl.runs import registry

logger = logging.getLogger(__name__)
_FILE_LOGGERS = ("quarl", "transformers.trainer", "trl")  # train.log gets their records (quarl's at INFO)
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "norm")  # Llama / Qwen2 RMSNorm module names


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- building blocks ----------------------------------------------------------------------------------------------
def _lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    from quarl.checkpoint import lora_custom_modules, lora_targets

    lora = cfg.lora
    packed = getattr(model, "quarl_checkpoint", None) is not None  # a pre-quantized compressed-tensors base
    targets: Any = list(lora.target_modules)
    if targets == ["all-linear"]:  # PEFT's all-linear matches nn.Linear only, not the packed CompressedLinear
        targets = lora_targets(model) if packed else "all-linear"
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", modules_to_save=list(NORM_NAMES) if lora.trainable_norms else None)
    if packed:
        peft_cfg._register_custom_module(lora_custom_modules())
    return get_peft_model(model, peft_cfg)


def _injector(model: Any, cfg: TrainConfig) -> Any:
    if cfg.injection is None:
        return None
    spec = cfg.injection
    checkpoint = getattr(model, "quarl_checkpoint", None)
    if checkpoint is not None:
        raise ValueError(f"model {cfg.model.name} is a pre-quantized checkpoint ({checkpoint.scheme.name}); it "
                         "already applies its quantization -- drop the injection block")
    injector = attach(model, spec, phase="training")
    heads = [m for m in injector.modules if m.split(".")[-1] == "lm_head" or m.endswith("lm_head.base_layer")]
    if heads and spec.apply_during.covers(Phase.TRAINING):
        injector.detach()
        raise ValueError("injection.quantize_lm_head with apply_during covering 'training' is not supported on TRL: "
                         "TRL's fused LM head reads lm_head.weight directly, so the head's injection would silently "
                         "not apply to the training log-probs. Use apply_during: rollout.")
    return injector


def _prompts(tokenizer: Any, problems: list) -> list[dict[str, Any]]:
    """Rows in TRL's format; the prompt renders to exactly the tokens `quarl.eval` conditions on (tested)."""
    from quarl.data.gsm8k import VERL_GSM8K_INSTRUCTION

    chat = bool(getattr(tokenizer, "chat_template", None))
    rows = []
    for p in problems:
        content = f"{p.question} {VERL_GSM8K_INSTRUCTION}"
        prompt = [{"role": "user", "content": content}] if chat else build_prompt(tokenizer, p.question)
        rows.append({"prompt": prompt, "ground_truth": p.ground_truth, "id": p.id})
    return rows


def _rewards(cfg: TrainConfig) -> tuple[list, list[float]]:
    g = cfg.grpo

    def accuracy(prompts: Any, completions: Any, ground_truth: Any, **_: Any) -> list[float]:
        return gsm8k_reward(prompts, completions, ground_truth, scorer=g.scorer, format_score=g.format_score)

    def format_ok(completions: Any, **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [1.0 if extract_answer(t, "strict") is not None else 0.0 for t in texts]

    if g.format_reward > 0:
        return [accuracy, format_ok], [1.0, g.format_reward]
    return [accuracy], [1.0]


def _trl_args(cfg: TrainConfig, run_dir: Path) -> Any:
    from trl import GRPOConfig

    g, world = cfg.grpo, _world()
    completions = g.prompts_per_step * g.generations
    if completions % world:
        raise ValueError(f"prompts_per_step x generations = {completions} is not divisible by {world} processes")
    save_steps = cfg.run.checkpoint_every or g.steps
    return GRPOConfig(
        output_dir=str(run_dir / "checkpoints"), max_steps=g.steps, per_device_train_batch_size=completions // world,
        gradient_accumulation_steps=1, num_generations=g.generations, num_iterations=1,
        learning_rate=g.lr, lr_scheduler_type=g.lr_schedule, warmup_steps=g.warmup_steps, weight_decay=g.weight_decay,
        max_grad_norm=g.grad_clip, loss_type=g.loss_type, beta=g.beta, epsilon=g.epsilon,
        epsilon_high=g.epsilon_high if g.epsilon_high is not None else g.epsilon, temperature=g.temperature,
        top_p=g.top_p, max_completion_length=g.max_new_tokens, scale_rewards=g.scale_rewards,
        gradient_checkpointing=g.gradient_checkpointing, use_vllm=g.use_vllm,
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, disable_dropout=cfg.lora.dropout == 0,
        seed=cfg.run.seed, data_seed=cfg.run.seed, logging_steps=1, save_strategy="steps", save_steps=save_steps,
        save_total_limit=cfg.run.keep_checkpoints, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, log_completions=False)


# --- run directory ------------------------------------------------------------------------------------------------
def _versions() -> dict[str, Any]:
    from importlib import metadata

    env = environment()
    for pkg in ("trl", "peft", "accelerate"):
        env[pkg] = metadata.version(pkg)
    return env


def _new_run(cfg: TrainConfig, out_dir: Path | None) -> Path:
    data = cfg.to_dict()
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / registry.run_id(data, cfg.run.seed,
                                                                                       cfg.run.name)
    if _rank() == 0:
        registry.create_run(run_dir, {"id": run_dir.name, "name": cfg.run.name, "seed": cfg.run.seed,
                                      "config_hash": registry.config_hash(data)})
        cfg.to_yaml(run_dir / "config.yaml", header=f"quarl train --resume {run_dir}  (resolved config)")
        (run_dir / "env.json").write_text(json.dumps(_versions(), indent=2, default=str) + "\n")
    else:
        _wait_for(run_dir / "config.yaml")
    return run_dir


def _wait_for(path: Path, timeout_s: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"rank {_rank()}: {path} did not appear (rank 0 failed to create the run?)")
        time.sleep(0.2)


def _rewind(run_dir: Path, step: int) -> None:
    """Drop what was recorded after ``step`` (the resumed run recomputes it): metrics rows and eval files."""
    rows = registry.read_metrics(run_dir)
    keep = [r for r in rows if r.get("step", 0) <= step]
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r, default=float) + "\n" for r in keep)
    for path in (run_dir / "eval").glob("step-*.jsonl"):
        if int(path.stem.split("-")[1]) > step:
            path.unlink()
    logger.info("resume: kept %d metrics rows up to step %d, dropped %d", len(keep), step, len(rows) - len(keep))


def _log_file(run_dir: Path) -> logging.Handler:
    """A ``train.log`` handler on quarl's, the HF Trainer's and TRL's loggers (removed when the run ends); which
    records reach it is up to the loggers' levels, which the caller owns."""
    handler = logging.FileHandler(run_dir / ("train.log" if _rank() == 0 else f"train.rank{_rank()}.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in _FILE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return handler


# --- the run ------------------------------------------------------------------------------------------------------
def _resolve(config: Any, overrides: list[str], out_dir: Path | None, resume: Path | None) -> tuple:
    if resume is None:
        cfg = load_config(config, overrides)
        return cfg, _new_run(cfg, out_dir), None
    if config is not None or overrides or out_dir is not None:
        raise ValueError("--resume DIR continues a run with its own resolved config; do not combine it with a "
                         "config, --set or --out")
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a quarl run directory (no config.yaml)")
    status = registry.run_status(run_dir)
    if status is registry.RunStatus.FINISHED:
        raise registry.RunFinishedError(f"{run_dir} already finished; finished runs are immutable")
    if status is registry.RunStatus.RUNNING and _rank() == 0:
        raise RuntimeError(f"{run_dir} is still running (heartbeat from a live process); refusing to resume it")
    cfg = load_config(run_dir / "config.yaml")
    ckpt = last_checkpoint(run_dir)
    if _rank() == 0:
        registry.clear_exit(run_dir)
        _rewind(run_dir, int(ckpt.name.split("-")[1]) if ckpt else -1)
    return cfg, run_dir, ckpt


def _build(cfg: TrainConfig, run_dir: Path, start_step: int) -> tuple:
    from transformers import PrinterCallback, set_seed

    from quarl.rl.callbacks import RunRecorder, Validator
    from quarl.rl.engine import QuarlGRPOTrainer
    from quarl.rl.options import Attached, TrainerOptions

    set_seed(cfg.run.seed)
    model, tokenizer = load_model(cfg.model.name, dtype=cfg.model.dtype)
    model = _lora(model, cfg)
    attached = Attached(injector=_injector(model, cfg),
                        aqn=AQN(model, cfg.aqn, cfg.grpo.steps, start_step) if cfg.aqn_enabled else None)
    train_rows = _prompts(tokenizer, load_source(cfg.data.source, cfg.data.train_n, "train", cfg.data.seed))
    val = load_source(cfg.data.val_source or cfg.data.source, cfg.eval.n, "test")
    from datasets import Dataset

    funcs, weights = _rewards(cfg)
    args = _trl_args(cfg, run_dir)
    args.reward_weights = weights
    if cfg.grpo.use_vllm:
        from quarl.rl.vllm import patch_llm_eager, vllm_args

        patch_llm_eager()
        for key, value in vllm_args(cfg.grpo.tis_cap).items():
            setattr(args, key, value)
    trainer = QuarlGRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(train_rows),
                               processing_class=tokenizer, options=TrainerOptions.from_config(cfg), attached=attached)
    if cfg.grpo.use_vllm:
        from quarl.rl.vllm import attach_to_vllm

        attached.vllm_injector, attached.vllm_aqn = attach_to_vllm(trainer, cfg.injection, cfg.aqn, cfg.grpo.steps,
                                                                   start_step)
    main = trainer.accelerator.is_main_process
    validator = Validator(model, tokenizer, val, attached, cfg, run_dir if main else None)
    recorder = RunRecorder(run_dir, validator, cfg.eval.every, cfg.grpo.steps, main, start_step)
    trainer.add_callback(recorder)
    trainer.remove_callback(PrinterCallback)  # RunRecorder owns stdout: a progress bar, not a dict per step
    return trainer, recorder, attached, model


def _check_after(attached: Any) -> None:
    if attached.aqn is not None and attached.aqn.applications == 0:
        raise RuntimeError("AQN was enabled but never fired during training (no rollout saw sigma > 0)")
    if attached.injector is not None and attached.injector.spec.apply_during.covers(Phase.ROLLOUT):
        attached.injector.check_fired("rollout")


def train(config: str | Path | dict | TrainConfig | None = None, overrides: list[str] | tuple[str, ...] = (),
          out_dir: str | Path | None = None, resume: str | Path | None = None) -> Path:
    """Run (or resume) one GRPO + LoRA training; returns the run directory.

    Args:
        config: a YAML path / string, a dict, a `TrainConfig`, or None for the defaults.
        overrides: ``key.sub=value`` strings (strict: unknown keys raise naming the nearest valid key).
        out_dir: the run directory (default ``runs/<id>`` from the config hash and seed; never overwritten).
        resume: an existing run directory to continue from its newest complete checkpoint.
    """
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    cfg, run_dir, ckpt = _resolve(config, list(overrides), Path(out_dir) if out_dir else None,
                                  Path(resume) if resume else None)
    threads = torch.get_num_threads()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    handler = _log_file(run_dir)
    start = int(ckpt.name.split("-")[1]) if ckpt else 0
    step = start
    try:
        trainer, recorder, attached, _ = _build(cfg, run_dir, start)
        try:
            if ckpt is None and recorder.main:
                recorder.write_row({"step": 0, **recorder.validator(0)})
                registry.heartbeat(run_dir, 0, cfg.grpo.steps)
            logger.info("train: %s from step %d of %d", run_dir, start, cfg.grpo.steps)
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
            step = trainer.state.global_step
            _check_after(attached)
        finally:
            recorder.close()
        if recorder.main:
            registry.mark_exit(run_dir, registry.RunStatus.FINISHED, step)
    except Exception as exc:
        logger.exception("train failed at step %d", step)
        if _rank() == 0:
            registry.mark_exit(run_dir, registry.RunStatus.FAILED, step, error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for name in _FILE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        torch.set_num_threads(threads)
    return run_dir
