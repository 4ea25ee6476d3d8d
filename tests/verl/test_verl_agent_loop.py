"""`QuarlAgentLoopManager`: verl's agent-loop manager, with AQN switched off on every vLLM server around validation.

Run: nox -s verl   (or, inside that environment: pytest tests/verl/test_verl_agent_loop.py)

A local Ray (one CPU) holds two server actors under verl's names, exposing the ``collective_rpc`` signature of verl's
vLLM server, and an agent-loop worker that records, while it generates, which calls the servers had received. verl's
own ``AgentLoopManager.generate_sequences`` (chunking, gathering, timing metrics) runs unchanged in between.
"""

import pytest

pytest.importorskip("verl.workers")

import ray  # noqa: E402
import torch  # noqa: E402


def _actors():
    """The two actor classes, defined here so that Ray pickles them by value (its workers need not import tests)."""

    @ray.remote
    class Server:  # the collective_rpc signature of verl's vLLMHttpServer
        def __init__(self):
            self.log = []

        async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            self.log.append((method, tuple(args)))

        def calls(self):
            return list(self.log)

    @ray.remote
    class Worker:  # an AgentLoopWorker: returns the chunk with what the servers had been told so far
        def ready(self):
            return True

        def generate_sequences(self, chunk):
            from verl import DataProto

            seen = ray.get([ray.get_actor(n).calls.remote() for n in ("vllm_server_0_0", "vllm_server_1_0")])
            out = DataProto.from_dict(tensors={"prompts": chunk.batch["prompts"], "attention_mask": torch.ones(2, 5)})
            out.meta_info["seen"] = seen  # verl's manager keeps the first chunk's meta_info
            out.meta_info["metrics"] = [{"generate_sequences": 0.1, "tool_calls": 0.0, "compute_score": 0.0,
                                         "num_preempted": 0}] * 2
            return out

    return Server, Worker


@pytest.fixture(scope="module")
def manager():
    import os

    from quarl.verl.agent_loop import QuarlAgentLoopManager

    # Ray's workers inherit the driver's environment; with VIRTUAL_ENV set (nox sets it) they died at start here
    # and every remote call hung. The interpreter is the same either way.
    venv = os.environ.pop("VIRTUAL_ENV", None)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    if venv is not None:
        os.environ["VIRTUAL_ENV"] = venv
    Server, Worker = _actors()
    try:
        servers = [Server.options(name=f"vllm_server_{i}_0").remote() for i in range(2)]
        m = object.__new__(QuarlAgentLoopManager)  # verl's __init__ would start real agent-loop workers
        m.agent_loop_workers = [Worker.remote()]
        # every actor is up before verl's code awaits them: a worker that fails to start is an error, not a hang
        ray.get([s.calls.remote() for s in servers] + [w.ready.remote() for w in m.agent_loop_workers], timeout=300)
        yield m, servers
    finally:
        ray.shutdown()


def _batch(validate: bool, global_steps: int | None = None):
    from verl import DataProto

    data = DataProto.from_dict(tensors={"prompts": torch.zeros(2, 3, dtype=torch.long)})
    data.meta_info["validate"] = validate
    if global_steps is not None:
        data.meta_info["global_steps"] = global_steps
    return data


def test_validation_turns_aqn_off_on_every_server_then_back_on(manager):
    m, servers = manager
    out = m.generate_sequences(_batch(validate=True))
    during = out.meta_info["seen"]
    assert during == [[("quarl_validation", (True,))]] * 2  # off on both servers while generating
    assert ray.get([s.calls.remote() for s in servers]) == [[("quarl_validation", (True,)),
                                                             ("quarl_validation", (False,))]] * 2
    assert "agent_loop/generate_sequences/mean" in out.meta_info["timing"]  # verl's own path ran


def test_training_batches_send_verls_step_and_nothing_else(manager):
    m, servers = manager
    before = ray.get([s.calls.remote() for s in servers])
    m.generate_sequences(_batch(validate=False))  # no step in meta_info: untouched
    assert ray.get([s.calls.remote() for s in servers]) == before
    out = m.generate_sequences(_batch(validate=False, global_steps=7))  # verl counts from 1: optimizer step 6
    assert out.meta_info["seen"] == [before[0] + [("quarl_set_step", (6,))]] * 2  # sent before generating


def test_no_server_is_an_error(manager, monkeypatch):
    import asyncio

    from quarl.verl import agent_loop

    monkeypatch.setattr(agent_loop, "SERVER_PREFIX", "sglang_server_")  # a rollout without quarl's vLLM servers
    with pytest.raises(RuntimeError, match="no vLLM server actor"):
        asyncio.run(agent_loop.set_validation(True))
