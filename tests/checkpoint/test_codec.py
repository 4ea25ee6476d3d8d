"""Tensor codec and scheme recognition: stored tensors decode to exactly quarl's fake-quantized weights.

Run: pytest tests/checkpoint/test_codec.py
"""

import pytest
import torch

from quarl.checkpoint import SCHEMES, compress_weight, get_scheme, pack_int4, scheme_from_config, unpack_int4
from quarl.checkpoint import weight_quantized
from quarl.formats import dequantize, fake_quantize


@pytest.mark.parametrize("name", list(SCHEMES))
def test_stored_weight_decodes_to_fake_quantize(name):
    scheme = get_scheme(name)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    w[0, :5] = torch.tensor([-1e-6, 1e-6, 0.0, -0.0, 0.3])  # zeros of both signs, tiny values that round to zero
    stored = compress_weight(w, scheme)
    got = dequantize(weight_quantized(stored, scheme, (48, 128), torch.float32))
    want = fake_quantize(w, scheme.weight_fmt)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # the sign of zero survives packing


def test_stored_layouts():
    w = torch.randn(32, 96)
    nv = compress_weight(w, get_scheme("NVFP4A16"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in nv.items()} == {
        "weight_packed": (torch.uint8, (32, 48)), "weight_scale": (torch.float8_e4m3fn, (32, 6)),
        "weight_global_scale": (torch.float32, (1,))}
    mx = compress_weight(w, get_scheme("MXFP4A16"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in mx.items()} == {
        "weight_packed": (torch.uint8, (32, 48)), "weight_scale": (torch.uint8, (32, 3))}
    i4 = compress_weight(torch.randn(32, 256), get_scheme("W4A16"))
    assert (i4["weight_packed"].dtype, tuple(i4["weight_packed"].shape)) == (torch.int32, (32, 32))
    assert (i4["weight_scale"].dtype, tuple(i4["weight_scale"].shape)) == (torch.float32, (32, 2))
    assert i4["weight_shape"].tolist() == [32, 256]
    fp8 = compress_weight(w, get_scheme("FP8"))
    assert fp8["weight"].dtype == torch.float8_e4m3fn and tuple(fp8["weight_scale"].shape) == (1,)


def test_global_amax_sets_the_nvfp4_global_scale():
    w = torch.randn(16, 32)
    joint = w.abs().amax() * 2  # a sibling with twice the amax: the encode factor halves
    a = compress_weight(w, get_scheme("NVFP4A16"))["weight_global_scale"]
    b = compress_weight(w, get_scheme("NVFP4A16"), global_amax=joint.reshape(1))["weight_global_scale"]
    assert torch.equal(b, (joint.reshape(1).reciprocal() * 2688.0))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("cols", [96, 100, 128, 8])
def test_int4_packing_matches_compressed_tensors(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q = torch.randint(-8, 8, (5, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    codes = (q.to(torch.int16) & 0xF).to(torch.uint8)  # quarl's two's-complement nibbles
    packed = pack_int4(codes)
    assert torch.equal(packed, pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(packed, cols), codes)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size([5, cols])), q)


def test_partial_blocks_are_rejected():
    with pytest.raises(ValueError, match="multiple of the block size"):
        compress_weight(torch.randn(4, 40), get_scheme("MXFP4A16"))
    with pytest.raises(ValueError, match="multiple of the group size 128"):
        compress_weight(torch.randn(4, 96), get_scheme("W4A16"))  # the testbed's hidden size


@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_recognized_from_its_config(name):
    scheme = get_scheme(name)
    assert scheme_from_config(scheme.quantization_config(["lm_head"])) is scheme


def test_unsupported_configs_are_rejected_with_the_reason():
    cfg = get_scheme("NVFP4A16").quantization_config(["lm_head"])
    two = {**cfg, "config_groups": {"a": cfg["config_groups"]["group_0"], "b": cfg["config_groups"]["group_0"]}}
    with pytest.raises(ValueError, match="single-group"):
        scheme_from_config(two)
    w8 = {**cfg, "config_groups": {"g": {**cfg["config_groups"]["group_0"], "weights": {
        **cfg["config_groups"]["group_0"]["weights"], "num_bits": 8}}}}
    with pytest.raises(ValueError, match="unsupported compressed-tensors group"):
        scheme_from_config(w8)
    with pytest.raises(ValueError, match="quant_method"):
        scheme_from_config({**cfg, "quant_method": "gptq"})
    with pytest.raises(ValueError, match="NVFP4A16"):
        get_scheme("NVFP4A61")
