"""Fixtures for the checkpoint tests: a tiny random Llama, calibration batches, cached exports per scheme."""

import pytest
import torch

from _ckpt_models import ckpt_llama
from quarl.checkpoint import export_checkpoint, get_scheme


@pytest.fixture(scope="session")
def tiny():
    return ckpt_llama(seed=0)


@pytest.fixture(scope="session")
def calib():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g)} for _ in range(2)]


@pytest.fixture(scope="session")
def tiny_export(tiny, calib, tmp_path_factory):
    """``tiny_export(scheme, fuse=None)`` -> directory of the tiny model exported with that scheme (cached)."""
    cache = {}

    def make(name: str, fuse: bool | None = None):
        key = (name, fuse)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{name}-{fuse}") / "ckpt"
            export_checkpoint(tiny, None, get_scheme(name), out, calibration=calib, fuse_global_scales=fuse,
                              progress=False)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="module")
def testbed():
    from quarl.models import load_model

    return load_model("testbed:tiny")  # (model, tokenizer), shared by the module


@pytest.fixture(scope="module")
def calibration(testbed):
    _, tok = testbed
    texts = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "12 + 7 = 19. #### 19"]
    return [{"input_ids": torch.tensor([tok.encode(t)])} for t in texts]
