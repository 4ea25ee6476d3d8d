"""The native CPU kernel (``quarl.formats.native``): bit-identical to ``fake_quantize_eager`` on the adversarial sets,
for every format variant and shape class it serves, and a clean fallback to eager without a compiler.

"Bit-identical" here is ``y.view(int32)`` equality: values, signs of zero and NaN bit patterns alike.

Run: python -m pytest tests/formats/test_native.py -q       (builds the kernel once per machine, ~1 s)
"""

import logging

import pytest
import torch
from _adversarial import FINITE, nonfinite

from quarl.formats import fake_quantize, fake_quantizer, get_format, native
from quarl.formats.quantize import fake_quantize_eager

MX_VARIANTS = [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("mxfp4", {"scale_mode": "even"}),
               ("mxfp4", {"scale_mode": "ceil"}), ("mxfp4", {"rounding": "half_away"}),
               ("mxfp4", {"profile": "compressed_tensors"}), ("mxfp4", {"block_size": 16}),
               ("mxfp6_e2m3", {}), ("mxfp6_e2m3", {"profile": "compressed_tensors"}), ("mxfp6_e3m2", {"scale_mode": "rceil"}),
               ("mxfp8_e4m3", {}), ("mxfp8_e4m3", {"profile": "compressed_tensors"}),
               ("mxfp8_e5m2", {"scale_mode": "ceil"}), ("mxint8", {}), ("mxint8", {"rounding": "half_away"}),
               ("mxint8", {"scale_mode": "rceil"})]
NV_VARIANTS = [("nvfp4", {"profile": p, "nonfinite": nf, **extra})
               for p in ("compressed_tensors", "torchao", "transformer_engine", "vllm")
               for nf in ("reference", "block") for extra in ({}, {"rounding": "half_away"})]
VARIANTS = MX_VARIANTS + NV_VARIANTS
IDS = [f"{n}-{'-'.join(f'{v}' for v in o.values()) or 'default'}" for n, o in VARIANTS]


@pytest.fixture(scope="module", autouse=True)
def built():
    if native.library() is None:
        pytest.skip("no C compiler: the native kernel cannot be built here (eager fallback is tested below)")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _check(x: torch.Tensor, fmt, global_amax=None) -> bool:
    """Assert native == eager bit for bit; returns whether the native kernel served the call."""
    ref = fake_quantize_eager(x, fmt, None, global_amax)
    y = native.fake_quantize(x, fmt, global_amax)
    if y is not None:
        assert _bits_equal(y, ref), f"{fmt} {tuple(x.shape)} {x.dtype}"
    assert _bits_equal(fake_quantize(x, fmt, global_amax=global_amax).float(), ref.to(x.dtype).float())
    return y is not None


def _edges() -> torch.Tensor:
    """test_fast's adversarial tensor: ties, zero / -0 blocks, 2^-130 subnormals, NaN, Inf, boundary maxima."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 96, generator=g) * torch.logspace(-6, 6, 48).unsqueeze(1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    x[0, :15], x[0, 15] = torch.cat([grid, (grid[1:] + grid[:-1]) / 2]), 6.0
    x[1, :32], x[2, :16] = 0.0, -0.0
    x[3] = torch.randn(96, generator=g) * 2.0**-130
    x[4, 7], x[5, 9] = float("nan"), float("inf")
    x[6, :8] = torch.tensor([7.0, 7.5, 8.0, 28.0, 448.0, 470.0, 480.0, 57344.0])
    return x


@pytest.mark.parametrize("name,opts", VARIANTS, ids=IDS)
def test_native_equals_eager_on_adversarial_families(name, opts):
    fmt = get_format(name, **opts)
    served = 0
    for family, gen in FINITE.items():
        for seed in (0, 1):
            x = gen(rows=32, cols=128, seed=seed)
            served += _check(x, fmt)
            served += _check(-x, fmt)
            _check(nonfinite(x, seed=seed), fmt)  # reference policy: eager decides; block policy: served
    _check(_edges(), fmt)
    assert served >= 2 * len(FINITE)  # the kernel really ran (torchao's all-zero 0/0 goes to eager)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=IDS)
def test_native_shape_classes(name, opts):
    # decode rows, partial last blocks, 1-D / 3-D, large enough for the multi-threaded path, non-contiguous
    fmt = get_format(name, **opts)
    g = torch.Generator().manual_seed(3)
    # (5, 45), (3, 1000): tails that are no multiple of the 8-lane vectors; (2, 4100), (70000,), (20, 4100): several
    # chunks of 64 blocks per row and a partial last block (the last two multi-threaded, the last with many rows)
    shapes = [(1, 96), (64, 96), (7, 40), (3, 5), (200,), (2, 3, 576), (130, 1024), (5, 45), (3, 1000), (2, 4100),
              (70000,), (20, 4100)]
    for shape in shapes:
        x = torch.randn(*shape, generator=g) * 3
        assert _check(x, fmt), shape
    x = torch.randn(96, 64, generator=g)
    assert _check(x.t(), fmt)  # non-contiguous input: made contiguous, same result


def _every_block_scale(seed: int) -> torch.Tensor:
    """One 32-block per amax exponent E in [-149, 127] (every E8M0 byte, both clamps, the kernel's mxfp4 fast path
    and its edges at bytes 1 and 230): amax 1.5 * 2^E, E2M1 ties at that scale and their fp32 neighbours,
    random magnitudes down to subnormals, signed zeros, random signs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for e in range(-149, 128):
        q = 2.0 ** (e - 2)  # the FLOOR scale of a block whose amax is 1.5 * 2^e = 6 * q
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0], dtype=torch.float64) * q
        near = torch.cat([ties * (1 + 2.0**-23), ties * (1 - 2.0**-23)])
        rand = torch.rand(5, generator=g, dtype=torch.float64) * 2.0 ** (e - torch.randint(0, 40, (5,), generator=g))
        sub = torch.randint(1, 1 << 20, (1,), generator=g).double() * 2.0**-149
        row = torch.cat([torch.tensor([1.5 * 2.0**e, 0.0]), ties, near, rand, sub])  # 32 values
        rows.append(row)
    x = torch.stack(rows).float()  # (277, 32): whole blocks, the fast paths' shape
    sign = torch.randint(0, 2, x.shape, generator=g).bool()
    return torch.where(sign, -x, x)


@pytest.mark.parametrize("name,opts", MX_VARIANTS[:8] + NV_VARIANTS[::2], ids=IDS[:8] + IDS[len(MX_VARIANTS)::2])
def test_native_every_block_scale(name, opts):
    fmt = get_format(name, **opts)
    for seed in (0, 1):
        x = _every_block_scale(seed)
        assert _check(x, fmt)
        assert _check(x.reshape(-1)[:-3], fmt)  # a partial last block; NVFP4: one tensor scale over all of them


@pytest.mark.parametrize("name,opts", [("mxfp4", {}), ("nvfp4", {}), ("nvfp4", {"profile": "torchao"}),
                                       ("nvfp4", {"profile": "transformer_engine", "nonfinite": "block"}),
                                       ("nvfp4", {"profile": "vllm"})])
def test_native_multithreaded_nonfinite(name, opts):
    # both NVFP4 passes in one parallel region: the tensor amax, the reference policy's "eager decides", NaN blocks
    fmt, threads = get_format(name, **opts), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = FINITE["outliers"](rows=256, cols=512, seed=4)  # 131072 elements: the multi-threaded path
        for y in (x, nonfinite(x, seed=4), nonfinite(x, seed=5, frac=1e-4)):
            _check(y, fmt)
        assert _check(x, fmt)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name,opts", VARIANTS, ids=IDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_native_streaming_stores(monkeypatch, name, opts, threads):
    # NT_MIN = 0: every call writes with streaming stores where the layout allows (one flat aligned run of blocks;
    # rows with partial blocks keep plain stores) -- the same bits, adversarial sets and shape classes alike
    monkeypatch.setattr(native, "NT_MIN", 0)
    fmt, before = get_format(name, **opts), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for family, gen in FINITE.items():
            x = gen(rows=32, cols=128, seed=7)
            assert _check(x, fmt) or fmt.profile.value == "torchao"  # (its all-zero 0/0: eager)
            _check(nonfinite(x, seed=7), fmt)
        _check(_edges(), fmt)
        g = torch.Generator().manual_seed(8)
        for shape in [(64, 96), (3, 1000), (70000,), (70001,), (256, 512), (20, 4100)]:
            assert _check(torch.randn(*shape, generator=g) * 3, fmt), shape
        bound = fake_quantizer(fmt)  # the hooks' path takes NT_MIN at call time too
        x = torch.randn(256, 512, generator=g)
        assert _bits_equal(bound(x), fake_quantize_eager(x, fmt, None, None))
    finally:
        torch.set_num_threads(before)


def test_native_portable_build(monkeypatch, tmp_path):
    # the generic vector code (no AVX2 intrinsics) that other CPUs build, on the adversarial sets
    from quarl.formats.native_source import SOURCE

    cc = native.compiler()
    path = tmp_path / "quarl_fq_portable.so"
    native._build(cc, "#define QUARL_PORTABLE 1\n" + SOURCE, path)
    lib = native.load(path)
    monkeypatch.setattr(native, "library", lambda: lib)
    try:
        for name, opts in [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("mxfp8_e4m3", {}),
                           ("nvfp4", {}), ("nvfp4", {"profile": "torchao", "rounding": "half_away"})]:
            fmt = get_format(name, **opts)
            for family, gen in FINITE.items():
                assert _check(gen(rows=16, cols=96, seed=0), fmt) or family == "all_zero"
            assert _check(_every_block_scale(0), fmt) and _check(torch.randn(3, 45), fmt)
            _check(_edges(), fmt)
    finally:
        native._bound.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name,opts", [("mxfp4", {}), ("nvfp4", {}), ("nvfp4", {"profile": "transformer_engine"}),
                                       ("nvfp4", {"profile": "vllm"})])
def test_native_other_dtypes(name, opts, dtype):
    fmt = get_format(name, **opts)
    x = FINITE["outliers"](rows=16, cols=96, seed=2).to(dtype)
    ref = fake_quantize_eager(x, fmt).to(dtype)
    y = fake_quantize(x, fmt)
    assert y.dtype == dtype and torch.equal(y.view(torch.int8) if dtype != torch.float64 else y, ref.view(torch.int8)
                                            if dtype != torch.float64 else ref)


@pytest.mark.parametrize("profile", ["compressed_tensors", "torchao", "transformer_engine", "vllm"])
@pytest.mark.parametrize("nonfinite_policy", ["reference", "block"])
def test_native_static_global_amax(profile, nonfinite_policy):
    fmt = get_format("nvfp4", profile=profile, nonfinite=nonfinite_policy)
    x = FINITE["normal"](rows=16, cols=64, seed=5)
    for amax in (1.0, 0.5, 1e-3, 1e30, 2.0**-140, 0.0, float("nan"), float("inf")):
        _check(x, fmt, torch.tensor([amax]))
    bad = x.clone()
    bad[0, 0], bad[3, 17] = float("inf"), float("nan")
    _check(bad, fmt, torch.tensor([2.0]))


def test_native_declines_what_it_does_not_serve():
    x = torch.randn(4, 64)
    for fmt in (get_format("mxfp4", rounding="stochastic", seed=0), get_format("nvfp4", hadamard=True),
                get_format("nvfp4", block_2d=True), get_format("mxfp4", axis=0), get_format("int4"),
                get_format("nf4"), get_format("fp8_e4m3")):
        assert native.fake_quantize(x, fmt) is None, fmt
    assert native.fake_quantize(torch.empty(0, 32), get_format("mxfp4")) is None
    assert native.fake_quantize(torch.randn(32), get_format("mxfp4"), torch.ones(1)) is None  # eager raises


def test_native_switch(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.fake_quantize(torch.randn(4, 64), get_format("mxfp4")) is None


def test_no_compiler_falls_back_to_eager(monkeypatch, tmp_path, caplog):
    native.library.cache_clear()
    monkeypatch.setenv("QUARL_CACHE_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", "/nonexistent/cc")
    try:
        with caplog.at_level(logging.INFO, logger="quarl.formats.native"):
            x = torch.randn(8, 64)
            assert native.fake_quantize(x, get_format("mxfp4")) is None
            assert torch.equal(fake_quantize(x, "mxfp4"), fake_quantize_eager(x, get_format("mxfp4")))
        assert "no C compiler" in caplog.text
    finally:
        native.library.cache_clear()


def test_build_failure_falls_back_to_eager(monkeypatch, tmp_path, caplog):
    native.library.cache_clear()
    monkeypatch.setenv("QUARL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    try:
        with caplog.at_level(logging.WARNING, logger="quarl.formats.native"):
            assert native.library() is None and native.library() is None  # memoized: one warning
        assert caplog.text.count("native kernel unavailable") == 1
        assert native.fake_quantize(torch.randn(4, 32), get_format("mxfp4")) is None
    finally:
        native.library.cache_clear()


def test_cache_key_depends_on_source(monkeypatch):
    # the built library's name carries the key, so an edited source is rebuilt (not a stale .so loaded)
    cc = native.compiler()
    if cc is None:
        pytest.skip("no compiler")
    assert native._key(cc, "int a;") != native._key(cc, "int b;")
    assert native._key(cc, "int a;") == native._key(cc, "int a;")


@pytest.mark.parametrize("name,opts", [("mxfp4", {}), ("nvfp4", {}), ("nvfp4", {"profile": "torchao"}),
                                       ("mxfp4", {"rounding": "stochastic", "seed": 1}), ("int4", {}),
                                       ("nvfp4", {"block_2d": True}), ("mxfp4", {"axis": 0})])
def test_fake_quantizer_equals_fake_quantize(name, opts):
    from quarl.formats import fake_quantizer

    fmt = get_format(name, **opts)
    fq = fake_quantizer(fmt)
    for x in (_edges(), FINITE["all_zero"](rows=16, cols=64), torch.randn(3, 2, 64).to(torch.bfloat16)):
        assert _bits_equal(fq(x).float(), fake_quantize(x, fmt).float())
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fq(a), fake_quantize(b, fmt)
        assert ya.grad_fn is not None and _bits_equal(ya.detach().float(), yb.detach().float())
        ya.sum().backward()
        yb.sum().backward()
        assert torch.equal(a.grad, b.grad)
    with pytest.raises(ValueError, match="floating-point"):
        fq(torch.ones(4, 64, dtype=torch.int32))
