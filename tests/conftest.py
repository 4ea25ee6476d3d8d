"""Shared pytest setup: GPU tests skip cleanly without CUDA; without CUDA, Triton kernels run in its interpreter."""

import os

import pytest
import torch

# Every cached quantized weight is checked bit for bit against its weight on every hit (quarl.inject.weights): a
# stale cache raises StaleWeightCacheError anywhere in the suite instead of passing silently.
os.environ.setdefault("QUARL_VERIFY_WEIGHT_CACHE", "1")

if not torch.cuda.is_available():
    # Read by triton when it is first imported -- which torch / inductor may do long before tests/formats/test_gpu.py
    # is collected, so it must be set here, at the root. Inductor's CPU backend does not use triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
