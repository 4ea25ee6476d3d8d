#!/bin/bash
set -x
python3 -m verl.trainer.main_ppo \
    data.train_files=$HOME/data/gsm8k/train.parquet \
    trainer.experiment_name=E13h_MXFP4_W4A4_AQN \
    trainer.total_training_steps=58 \
    trainer.hw_error_injection.enabled=True \
    trainer.hw_error_injection.error_type=mxfp4 \
    trainer.hw_error_injection.injection_point=both \
    trainer.hw_error_injection.exclude_modules=[lm_head,embed_tokens] \
    trainer.noise_injection.enabled=True \
    trainer.noise_injection.sigma_start=0.01 \
    trainer.noise_injection.layer_sigma_config={0:2.0} \
    trainer.logger=[console] $@
