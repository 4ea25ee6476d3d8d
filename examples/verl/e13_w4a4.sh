#!/usr/bin/env bash
# E13: GRPO + LoRA r32 on GSM8K under emulated W4A4 (MXFP4 or NVFP4, STE, AQN), Qwen2.5-1.5B-Instruct, plain verl
# 0.9.x with quarl as a plugin -- no fork. 8 GPUs (or NPUs) on one node. See docs/verl.md.
#
#   pip install 'quarl[verl]' vllm          # the vLLM release your verl supports
#   # GSM8K parquet in verl's format ($DATA/train.parquet, test.parquet): verl's examples/data_preprocess/gsm8k.py
#   DATA=$HOME/data/gsm8k bash examples/verl/e13_w4a4.sh
#
# The quarl block (injection + AQN) is e13_w4a4.quarl.yaml next to this script; every worker reads it through the
# QUARL_VERL_CONFIG environment variable that Ray passes to all of them.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
DATA="${DATA:-$HOME/data/gsm8k}"
QUARL_VERL_CONFIG="${QUARL_VERL_CONFIG:-$HERE/e13_w4a4.quarl.yaml}"

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    actor_rollout_ref.model.path=Qwen/Qwen2.5-1.5B-Instruct \
    actor_rollout_ref.model.lora_rank=32 \
    actor_rollout_ref.model.lora_alpha=64 \
    actor_rollout_ref.model.target_modules=all-linear \
    actor_rollout_ref.model.lora.merge=True \
    actor_rollout_ref.model.external_lib=quarl.verl \
    +ray_kwargs.ray_init.runtime_env.env_vars.QUARL_VERL_CONFIG="$QUARL_VERL_CONFIG" \
    actor_rollout_ref.actor.strategy=fsdp2 \
    actor_rollout_ref.ref.strategy=fsdp2 \
    actor_rollout_ref.actor.optim.lr=1e-5 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.5 \
    actor_rollout_ref.rollout.enforce_eager=True \
    +actor_rollout_ref.rollout.engine_kwargs.vllm.worker_extension_cls=quarl.verl.rollout.QuarlWorkerExtension \
    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=quarl.verl.agent_loop.QuarlAgentLoopManager \
    reward.custom_reward_function.path=pkg://quarl.verl.reward \
    reward.custom_reward_function.name=compute_score \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.total_training_steps=116 \
    trainer.test_freq=10 \
    trainer.val_before_train=True \
    trainer.project_name=quarl_verl \
    trainer.experiment_name=E13_mxfp4_w4a4_aqn \
    trainer.logger='["console"]' "$@"
