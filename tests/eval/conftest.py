"""Shared setup for tests/eval: one torch thread (tiny models are ~100x slower with 2 contended threads)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
