"""Stand-ins for the ``vllm`` package, so that verl's real ``vLLMColocateWorkerExtension`` imports without vLLM (test
infrastructure; vLLM needs a GPU). ``install()`` registers a finder that answers every ``vllm`` / ``vllm.*`` import
with a module whose unknown attributes are inert classes, and a ``vllm-0.18.0`` distribution record (verl checks
the installed version). Only for a spawned test process: it never runs in the pytest process itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import tempfile
import types
from pathlib import Path

VERSION = "0.18.0"  # the lowest vLLM verl 0.9.1 supports


class _Inert:
    """Any vLLM class or function verl touches at import or in the code paths under test: accepts anything."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __call__(self, *args, **kwargs):
        return None


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Inert,), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "vllm" or fullname.startswith("vllm."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = VERSION
        return module

    def exec_module(self, module):
        return None


def install() -> None:
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    site = Path(tempfile.mkdtemp(prefix="vllm_stub_"))
    info = site / f"vllm-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}\n")
    sys.path.append(str(site))
    sys.meta_path.insert(0, _Finder())
