"""quarl.noise: adaptive quantization noise (AQN) -- when (schedules), how much (sigma) and where (selection).

    from quarl.noise import AQN, AQNConfig, sigma_at
    sigma_at(60, 600, schedule="qerl", sigma_start=1e-2, sigma_end=1e-4, num_stages=10)   # 0.01
    aqn = AQN(model, AQNConfig(), total_steps=600)         # raises if nothing matches or sigma is always 0
    with aqn.noised(step) as stats:                         # RMSNorm gains perturbed, restored bit-exactly after
        generate(...)
"""

from quarl.noise.aqn import AQN, AQNConfig, select_aqn_modules
from quarl.noise.schedule import Schedule, check_schedule, sigma_at

__all__ = ["AQN", "AQNConfig", "Schedule", "check_schedule", "select_aqn_modules", "sigma_at"]
