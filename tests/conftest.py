"""Shared pytest setup: GPU tests skip cleanly without CUDA; without CUDA, Triton kernels run in its interpreter."""

import os

import pytest
import torch

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
