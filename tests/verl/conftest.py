"""tests/verl run in their own environment (``nox -s verl``: verl 0.9.1 pins transformers<5.11); in quarl's main venv
every module here skips at import (``pytest.importorskip("verl.workers")``: this folder, on ``sys.path`` as
a namespace package named ``verl``, has no ``workers``). With verl installed, the CPU platform is
registered before any test imports ``verl.workers`` (verl resolves its device name at import)."""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_spec = importlib.util.find_spec("verl")  # this folder is a namespace package named verl too: it has no origin
if _spec is not None and _spec.origin is not None:
    import _cpu_platform

    _cpu_platform.install()
