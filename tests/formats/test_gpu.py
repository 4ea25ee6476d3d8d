"""The Triton kernels (``quarl.formats.gpu``): bit-identical to ``fake_quantize_eager``.

Without a GPU they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before the kernels
are built; numpy executes every op, so this checks the kernel *logic*: bit tricks, operation order, rounding). The
``gpu`` test runs the compiled kernels on CUDA, where ``div_rn`` and the RNE trick are what make them exact.
Skipped when triton is not installed.

Run: python -m pytest tests/formats/test_gpu.py -q          (interpreter: ~1 min on 2 cores)
     python -m pytest tests/formats/test_gpu.py -q -m gpu   (CUDA)
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read by triton when it is first imported
triton = pytest.importorskip("triton")

from _adversarial import FINITE, nonfinite  # noqa: E402

from quarl.formats import get_format, gpu  # noqa: E402
from quarl.formats.quantize import fake_quantize_eager  # noqa: E402

VARIANTS = [("mxfp4", {}), ("mxfp4", {"scale_mode": "rceil"}), ("mxfp4", {"scale_mode": "even"}),
            ("mxfp4", {"scale_mode": "ceil", "rounding": "half_away"}), ("mxfp4", {"profile": "compressed_tensors"}),
            ("mxfp6_e3m2", {}), ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {}), ("mxint8", {}),
            ("nvfp4", {}), ("nvfp4", {"nonfinite": "block"}), ("nvfp4", {"profile": "torchao"}),
            ("nvfp4", {"profile": "torchao", "nonfinite": "block"}), ("nvfp4", {"profile": "transformer_engine"}),
            ("nvfp4", {"profile": "transformer_engine", "nonfinite": "block", "rounding": "half_away"})]
IDS = [f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in VARIANTS]
FAMILIES = ("normal", "outliers", "grid_ties", "nv_ties", "pow2_neighbours", "tiny", "huge", "zero_blocks", "all_zero")


def _bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module")
def interpreter():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu test runs the compiled kernels instead")
    if not triton.knobs.runtime.interpret:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (run this file on its own)")


def _inputs(device):
    xs = [FINITE[f](rows=16, cols=64, seed=1) for f in FAMILIES]
    xs.append(nonfinite(FINITE["normal"](rows=16, cols=64, seed=2), seed=2))
    xs.append(-FINITE["outliers"](rows=3, cols=96, seed=3))
    return [x.to(device) for x in xs]


def _check_all(fmt, device):
    served = 0
    for x in _inputs(device):
        y = gpu.fake_quantize(x, fmt)
        if y is not None:
            served += 1
            assert _bits_equal(y.cpu(), fake_quantize_eager(x.cpu(), fmt)), (fmt, tuple(x.shape))
    assert served >= len(FAMILIES) - 1  # torchao's all-zero tensor (and NaN under "reference") go to eager


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the discarded lanes of NaN / Inf blocks
@pytest.mark.parametrize("name,opts", VARIANTS, ids=IDS)
def test_triton_interpreter_equals_eager(interpreter, name, opts):
    _check_all(get_format(name, **opts), "cpu")


def test_triton_declines_partial_blocks_and_unserved_formats(interpreter):
    assert gpu.fake_quantize(torch.randn(4, 40), get_format("mxfp4")) is None  # 40 % 32 != 0
    assert gpu.fake_quantize(torch.randn(4, 64), get_format("int4")) is None
    assert gpu.fake_quantize(torch.randn(4, 64), get_format("nvfp4", block_2d=True)) is None


@pytest.mark.gpu
@pytest.mark.parametrize("name,opts", VARIANTS, ids=IDS)
def test_triton_cuda_equals_cpu_eager(name, opts):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_all(get_format(name, **opts), "cuda")
