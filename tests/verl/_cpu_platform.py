"""A CPU platform for verl (device ``cpu``, vendor ``cpu``, backend ``gloo``), registered through verl's own
``PlatformRegistry`` -- test infrastructure, so that verl's real FSDP engine runs on a machine without accelerators.

It must be installed before anything imports ``verl.workers`` (verl resolves the device name at import). Engine
lookups then use ``VERL_ENGINE_DEVICE=cuda`` / ``VERL_ENGINE_VENDOR=nvidia``: no engine is registered for ``cpu``, and
(cuda, nvidia) is the key quarl registers, like verl's own CUDA platform reports.
"""

from __future__ import annotations

import contextlib
import os

import torch


class _CpuDevice:
    """What verl calls on ``torch.cuda``, for the CPU: one device, no memory statistics, no-op synchronization."""

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"  # verl moves tensors with .to(current_device()): an index would mean cuda:<index>

    def device_count(self) -> int:
        return 1

    def set_device(self, index) -> None:
        return None

    def synchronize(self, index=None) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def get_rng_state(self, device=None):
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)

    def memory_allocated(self, device=None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return (0, 0)

    def reset_peak_memory_stats(self, device=None) -> None:
        return None


def install() -> None:
    """Register and select the CPU platform (idempotent); set the engine lookup to (cuda, nvidia)."""
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    os.environ.setdefault("VERL_ENGINE_VENDOR", "nvidia")
    if PlatformRegistry.get("cpu") is not None:
        return

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = _CpuDevice()

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return True

        current_device = device_module.current_device
        device_count = device_module.device_count

        def set_device(self, device_index):
            return None

        def synchronize(self, device_index=None):
            return None

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

        def set_allocator_settings(self, settings):
            return None

        def empty_cache(self):
            return None

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            return None

        def profiler_stop(self):
            return None

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    if platform_manager._current_platform is None:
        platform_manager.set_platform(PlatformCPU())
