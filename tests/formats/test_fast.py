"""The compiled fast path (``quarl.formats.fast``): eligibility, clean fallback to eager, cache location, and
(``slow``: it compiles every format, minutes on 2 cores) bit-identity with the eager path on adversarial inputs.

Run: python -m pytest tests/formats/test_fast.py -q            (default: no compilation)
     python -m pytest tests/formats/test_fast.py -q -m slow    (compiled == eager for every format)
"""

import logging
import os

import pytest
import torch

from quarl.formats import fake_quantize, get_format
from quarl.formats import fast, native
from quarl.formats.quantize import fake_quantize_eager


@pytest.fixture
def clean_fast_state():
    fast.compiled_for.cache_clear()  # the only state: the bounded memo of compiled formats
    yield
    fast.compiled_for.cache_clear()


def test_eligibility(monkeypatch, clean_fast_state):
    big, small = torch.empty(fast.MIN_NUMEL), torch.empty(16)
    monkeypatch.delenv(fast.ENV_SWITCH, raising=False)
    assert fast.enabled_for(big, get_format("nvfp4")) and not fast.enabled_for(small, get_format("nvfp4"))
    assert not fast.enabled_for(big, get_format("mxfp4", rounding="stochastic"))
    assert not fast.enabled_for(big, get_format("nvfp4", hadamard=True))
    monkeypatch.setenv(fast.ENV_SWITCH, "0")
    assert not fast.enabled_for(big, get_format("nvfp4"))
    monkeypatch.setenv(fast.ENV_SWITCH, "1")
    assert fast.enabled_for(small, get_format("nvfp4"))
    assert not fast.enabled_for(torch.empty(fast.MIN_NUMEL, device="meta"), get_format("nvfp4"))


def test_compile_failure_falls_back_to_eager(monkeypatch, clean_fast_state, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv(fast.ENV_SWITCH, "1")
    monkeypatch.setenv(native.ENV_SWITCH, "0")  # nvfp4 would otherwise take the native kernel first
    x = torch.randn(4, 64)
    fmt = get_format("nvfp4")
    with caplog.at_level(logging.WARNING, logger="quarl.formats.fast"):
        y = fake_quantize(x, fmt)
        assert torch.equal(fake_quantize(x, fmt), y)  # second call: eager again, without a second warning
    assert torch.equal(y, fake_quantize_eager(x, fmt))
    assert caplog.text.count("no compiler here") == 1 and fast.compiled_for(fmt).failed  # not retried
    assert fast.try_fake_quantize(x, fmt, None, None) is None


def test_compiled_formats_are_memoized_per_format(clean_fast_state):
    # nothing is compiled before the first call, so this test compiles nothing
    a, b = get_format("mxfp4"), get_format("mxfp4", scale_mode="rceil")
    assert fast.compiled_for(a) is fast.compiled_for(a) and fast.compiled_for(a) is not fast.compiled_for(b)
    assert fast.compiled_for(a).name != fast.compiled_for(b).name  # distinct code objects -> distinct Dynamo caches
    assert fast.compiled_for(get_format("mxfp4")).name == fast.compiled_for(a).name  # stable (on-disk cache hits)
    assert fast.compiled_for.cache_info().maxsize == fast.MAX_FORMATS and fast.compiled_for.cache_info().currsize == 2


def test_no_module_level_mutable_state():
    # quarl.formats keeps no globals; the memo above is the one explicit, bounded exception
    mutable = {n for n, v in vars(fast).items() if isinstance(v, (dict, list, set)) and not n.startswith("__")}
    assert mutable == set()


def test_inductor_cache_dir_default_never_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv(fast.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fast._default_inductor_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    fast._default_inductor_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


def test_cache_dir_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv(fast.ENV_CACHE, str(tmp_path))
    assert fast.cache_dir() == tmp_path / "inductor"


def _adversarial():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 96, generator=g) * torch.logspace(-6, 6, 48).unsqueeze(1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    ties = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])  # 15 values: the FP4 grid and every tie
    x[0, :15], x[0, 15] = ties, 6.0
    x[1, :32] = 0.0
    x[2, :16] = -0.0
    x[3] = torch.randn(96, generator=g) * 2.0**-130
    x[4, 7] = float("nan")
    x[5, 9] = float("inf")
    x[6, :8] = torch.tensor([7.0, 7.5, 8.0, 28.0, 448.0, 470.0, 480.0, 57344.0])
    return x


def _same(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)) and torch.equal(torch.signbit(a), torch.signbit(b))


FAST_VARIANTS = [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("mxfp4", {"scale_mode": "even"}),
                 ("mxfp4", {"rounding": "half_away"}), ("mxfp6_e2m3", {}), ("mxfp6_e3m2", {}),
                 ("mxfp8_e4m3", {"profile": "compressed_tensors"}), ("mxfp8_e5m2", {"scale_mode": "ceil"}),
                 ("mxint8", {}), ("nvfp4", {}), ("nvfp4", {"profile": "torchao"}),
                 ("nvfp4", {"profile": "transformer_engine"}), ("nvfp4", {"block_2d": True}), ("fp8_e4m3", {}),
                 ("fp8_e5m2", {"granularity": "per_channel"}), ("int8", {}), ("int4", {}), ("nf4", {})]


@pytest.mark.slow
def test_compiled_equals_eager_for_every_format(monkeypatch, clean_fast_state):
    # one process, all formats: also guards against a compiled graph being reused for another format
    monkeypatch.setenv(fast.ENV_SWITCH, "1")
    x = _adversarial()
    for name, opts in FAST_VARIANTS:
        fmt = get_format(name, **opts)
        for inp in (x, x[:17, :64], x.to(torch.bfloat16)):  # dynamic shapes, partial blocks, bf16
            y = fast.try_fake_quantize(inp, fmt, None, None)
            assert y is not None, f"{name} {opts}: the compiled path did not run"
            assert _same(y, fake_quantize_eager(inp, fmt)), f"{name} {opts} {tuple(inp.shape)} {inp.dtype}"


@pytest.mark.gpu
def test_cuda_matches_cpu(monkeypatch, clean_fast_state):
    # CUDA eager and the forced compiled (Triton) path must equal the CPU eager result bit for bit
    x = _adversarial()
    for name, opts in FAST_VARIANTS:
        fmt = get_format(name, **opts)
        cpu = fake_quantize_eager(x, fmt)
        monkeypatch.setenv(fast.ENV_SWITCH, "0")
        assert _same(fake_quantize(x.cuda(), fmt).cpu(), cpu), f"eager cuda {name} {opts}"
        monkeypatch.setenv(fast.ENV_SWITCH, "1")
        y = fast.try_fake_quantize(x.cuda(), fmt, None, None)
        assert y is not None and _same(y.cpu(), cpu), f"compiled cuda {name} {opts}"
