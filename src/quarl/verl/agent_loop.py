"""Validation without AQN: ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=
quarl.verl.agent_loop.QuarlAgentLoopManager``.

verl's trainer marks validation batches (``meta_info["validate"] = True``) but never tells the rollout workers, so
AQN noise applied after a weight sync would stay on while verl validates. This subclass of verl's
``AgentLoopManager`` (a seam verl 0.9.1 offers by configuration) turns the noise off on every vLLM server around a
validation batch: ``collective_rpc("quarl_validation", True)`` before, ``False`` after (even when generation raises),
on each server actor verl names ``vllm_server_*``. Training batches pass through untouched. Finding no server is an
error: the validation would otherwise run noised without a word.

Training batches carry verl's ``meta_info["global_steps"]`` (counted from 1); before generating one, the manager
sends ``quarl_set_step(global_steps - 1)``, so the AQN schedule follows verl's step, also in a resumed run.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from verl.experimental.agent_loop import AgentLoopManager
from verl.utils.ray_utils import auto_await

logger = logging.getLogger(__name__)
SERVER_PREFIX = "vllm_server_"


def rollout_servers() -> list:
    """Handles of verl's vLLM server actors (named ``vllm_server_<replica>_<node>``) in this Ray job."""
    names = sorted(n for n in ray.util.list_named_actors() if n.startswith(SERVER_PREFIX))
    return [ray.get_actor(n) for n in names]


async def _call_all(method: str, *args) -> int:
    """``method(*args)`` on every vLLM worker of every server (``collective_rpc``); returns the servers reached."""
    servers = rollout_servers()
    if not servers:
        raise RuntimeError(f"quarl.verl: no vLLM server actor named {SERVER_PREFIX}* found for {method} (is the "
                           "rollout vllm, with quarl's worker extension?)")
    await asyncio.gather(*[s.collective_rpc.remote(method, args=args) for s in servers])
    return len(servers)


async def set_validation(on: bool) -> int:
    """``quarl_validation(on)`` on every rollout server (AQN off while ``on``)."""
    n = await _call_all("quarl_validation", on)
    logger.info("quarl.verl: validation %s on %d rollout servers (AQN %s)", "begins" if on else "ends", n,
                "off" if on else "back on")
    return n


async def set_step(step: int) -> int:
    """``quarl_set_step(step)`` on every rollout server: the optimizer step the next rollouts serve."""
    return await _call_all("quarl_set_step", step)


class QuarlAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager``; validation batches run with AQN off on every rollout server."""

    @auto_await
    async def generate_sequences(self, prompts):
        if not bool(prompts.meta_info.get("validate", False)):
            global_steps = prompts.meta_info.get("global_steps")
            if isinstance(global_steps, int) and global_steps >= 1:  # verl counts steps from 1
                await set_step(global_steps - 1)
            return await super().generate_sequences(prompts)
        await set_validation(True)
        try:
            return await super().generate_sequences(prompts)
        finally:
            await set_validation(False)
