"""nox sessions for test environments that cannot share quarl's main venv.

    pip install nox && nox -s verl            # ~minutes: builds .nox/verl, runs tests/verl on CPU

``verl``: quarl inside verl 0.9.1's FSDP engine, vLLM worker extension and reward manager (tests/verl). verl pins
``transformers<5.11`` and ``python<3.13``, so it gets its own environment. torch is installed first, alone, so that
no dependency resolves a different (CUDA) build; every later install is constrained to that same torch.
``QUARL_NOX_TORCH`` overrides the torch requirement (GPU users: their CUDA build).
"""

from __future__ import annotations

import os
import sys

import nox

nox.options.sessions = ["verl"]
nox.options.reuse_existing_virtualenvs = True

VERL = "verl==0.9.1"
# Parts of verl's rollout / server packages that the worker extension and the reward manager import
# (verl's own `verl-core` extra lists them; the whole extra pulls CUDA-only wheels).
VERL_RUNTIME = ["pyzmq", "msgspec", "fastapi", "uvicorn", "cachetools", "pytest-asyncio"]


@nox.session
def verl(session: nox.Session) -> None:
    """tests/verl against verl's real FSDP engine on CPU (world size 1 and 2, gloo)."""
    if sys.version_info >= (3, 13):
        session.error(f"verl 0.9.1 needs Python < 3.13; run nox with a 3.11 or 3.12 interpreter "
                      f"(this is {sys.version.split()[0]})")
    torch_req = os.environ.get("QUARL_NOX_TORCH", "torch==2.13.0")
    session.install(torch_req)
    constraints = session.create_tmp() + "/torch-constraint.txt"
    torch_line = session.run("python", "-c", "import torch; print(torch.__version__.split('+')[0])",
                             silent=True).strip().splitlines()[-1]
    with open(constraints, "w") as f:
        f.write(f"torch=={torch_line}\n")
    session.install("-c", constraints, VERL, *VERL_RUNTIME)
    session.install("-c", constraints, "-e", ".[verl]", "pytest>=8")
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "QUARL_VERIFY_WEIGHT_CACHE": "1"}
    session.run("python", "-m", "pytest", "tests/verl", "-q", "-p", "no:cacheprovider", *session.posargs, env=env)
