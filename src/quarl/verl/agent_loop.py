"""Validation without AQN: ``actor_rollout_ref.rollout.agent.agent_loop_manager_class=
quarl.verl.agent_loop.QuarlAgentLoopManager``.

verl's trainer marks validation batches (``meta_info["validate"] = True``) but never tells the rollout workers, so
AQN noise applied after a weight sync would stay on while verl validates. This subclass of verl's
``AgentLoopManager`` (a seam verl 0.9.1 offers by configuration) turns the noise off on every vLLM server around a
validation batch: ``collective_rpc("quarl_validation", True)`` before, ``False`` after (even when generation raises),
on each server actor verl names ``vllm_server_*``. Training batches pass through untouched. Finding no server is an
error: the validation would otherwise run noised without a word.
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


async def set_validation(on: bool) -> int:
    """``quarl_validation(on)`` on every vLLM worker of every server; returns the number of servers reached."""
    servers = rollout_servers()
    if not servers:
        raise RuntimeError(f"quarl.verl: no vLLM server actor named {SERVER_PREFIX}* found; cannot switch AQN "
                           "off for validation (is the rollout vllm, with quarl's worker extension?)")
    await asyncio.gather(*[s.collective_rpc.remote("quarl_validation", args=(on,)) for s in servers])
    logger.info("quarl.verl: validation %s on %d rollout servers (AQN %s)", "begins" if on else "ends",
                len(servers), "off" if on else "back on")
    return len(servers)


class QuarlAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager``; validation batches run with AQN off on every rollout server."""

    @auto_await
    async def generate_sequences(self, prompts):
        if not bool(prompts.meta_info.get("validate", False)):
            return await super().generate_sequences(prompts)
        await set_validation(True)
        try:
            return await super().generate_sequences(prompts)
        finally:
            await set_validation(False)
