"""Hand-written tie and hand-check tables (the tie table and hand checks of docs/formats.md) in the torchao
``test_kernels.py::test_fp4_*`` style: input, expected output, and why.

Run: python -m pytest tests/formats/test_ties.py -q
"""

import pytest
import torch

from quarl.formats import fake_quantize, quantize
from quarl.formats.rounding import RoundingMode, round_to_float_grid
from quarl.formats.spec import E2M1, E4M3

# (input, RNE, half-away)   -- E2M1 at scale 1
FP4_TIES = [
    (0.25, 0.0, 0.5),  # tie 0 / 0.5: 0 is even
    (0.75, 1.0, 1.0),  # tie 0.5 / 1: 1.0 is even (code 2)
    (1.25, 1.0, 1.5),  # tie 1 / 1.5: 1.0 is even
    (1.75, 2.0, 2.0),  # tie 1.5 / 2: 2.0 is even (carry into the next binade)
    (2.5, 2.0, 3.0),  # tie 2 / 3: 2.0 is even
    (3.5, 4.0, 4.0),  # tie 3 / 4: 4.0 is even
    (5.0, 4.0, 6.0),  # tie 4 / 6: 4.0 is even
    (6.5, 6.0, 6.0),  # above max: saturate
    (1e30, 6.0, 6.0),  # far above max: saturate, never Inf
    (0.2499999, 0.0, 0.0),  # just below a tie
    (0.2500001, 0.5, 0.5),  # just above a tie
]


@pytest.mark.parametrize("x,rne,away", FP4_TIES)
def test_fp4_ties(x, rne, away):
    t = torch.tensor([x, -x], dtype=torch.float32)
    assert round_to_float_grid(t, E2M1).tolist() == [rne, -rne]
    assert round_to_float_grid(t, E2M1, RoundingMode.HALF_AWAY).tolist() == [away, -away]


def test_e4m3_ties():
    # step 32 in [256, 448]; 272 ties 256/288 -> 256 (mantissa 000 even); 304 ties 288/320 -> 320; 464 saturates
    t = torch.tensor([272.0, 304.0, 464.0, 2.0**-10, 3 * 2.0**-10])
    assert round_to_float_grid(t, E4M3).tolist() == [256.0, 320.0, 448.0, 0.0, 2.0**-8]


def test_mx_midpoints_at_unit_scale():
    # amax 6 -> floor(log2 6) - 2 = 0 -> byte 127, so the elements are rounded at scale 1
    x = torch.zeros(32)
    x[:8] = torch.tensor([6.0, 5.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5])
    q = quantize(x, "mxfp4")
    assert q.scales.tolist() == [127]
    assert fake_quantize(x, "mxfp4")[:8].tolist() == [6.0, 4.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0]
    assert fake_quantize(x, "mxfp4", rounding="half_away")[:8].tolist() == [6.0, 6.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("mode,byte,seven", [("floor", 127, 6.0), ("ceil", 128, 8.0), ("even", 128, 8.0),
                                             ("rceil", 128, 8.0)])
def test_mx_saturation_amax7(mode, byte, seven):
    # FLOOR: s = 2 - 2 = 0, 7 saturates to 6. EVEN: 1.75 >= 1.75 bumps to s = 1, 7/2 = 3.5 -> 4 -> 8.
    # RCEIL: ceil(log2(7/6)) = 1 -> 8. CEIL: 7 has mantissa bits -> s = 1.
    x = torch.zeros(32)
    x[0] = 7.0
    assert quantize(x, "mxfp4", scale_mode=mode).scales.tolist() == [byte]
    assert fake_quantize(x, "mxfp4", scale_mode=mode)[0].item() == seven


def test_mx_fp32_denormal_range():
    # amax = 1.5 * 2^-125: floor = -125 -> s = -127 -> byte 0; x * 2^127 = 6 exactly, 6 * 2^-127 = amax (exact)
    amax = 1.5 * 2.0**-125
    x = torch.zeros(32)
    x[0], x[1] = amax, amax / 2  # amax/2 -> 3 * 2^-127
    q = quantize(x, "mxfp4")
    assert q.scales.tolist() == [0]
    y = fake_quantize(x, "mxfp4")
    assert y[0].item() == amax and y[1].item() == amax / 2  # not amax/2 and amax/4 (torchao 0.18's 2^-126 bug)


def test_mxfp8_microxcaling_issue4():
    # block amax 960 -> FLOOR s = 9 - 8 = 1; 957/2 = 478.5 saturates to 448 -> 896 (microsoft/microxcaling#4)
    x = torch.zeros(32)
    x[0], x[1] = 960.0, 957.0
    assert fake_quantize(x, "mxfp8_e4m3")[:2].tolist() == [896.0, 896.0]
    assert fake_quantize(x, "mxfp8_e4m3", scale_mode="rceil")[:2].tolist() == [960.0, 960.0]


def test_mxfp8_amax_470_ct_vs_even():
    # CT rounds amax with a 1-bit mantissa (threshold 1.75): 470 = 1.836 * 2^8 -> 2^9 -> s = 1 -> 470/2 = 235 -> 240
    # torchao EVEN uses 3 bits (threshold 1.9375) -> s = 0 -> 470 -> 448 (saturated)
    x = torch.zeros(32)
    x[0] = 470.0
    assert fake_quantize(x, "mxfp8_e4m3", profile="compressed_tensors")[0].item() == 480.0
    assert fake_quantize(x, "mxfp8_e4m3", scale_mode="even")[0].item() == 448.0
    assert fake_quantize(x, "mxfp8_e4m3")[0].item() == 448.0


def test_mx_rceil_from_bits_not_log2():
    # amax = 96.0000076: amax/6 = 16.0000013 > 2^4 -> ceil -> 2^5 (torchao 0.18's float log2 gives 2^4)
    x = torch.zeros(32)
    x[0] = 96.0000076
    assert quantize(x, "mxfp4", scale_mode="rceil").scales.tolist() == [127 + 5]


def test_mx_floor_below_pow2_from_bits():
    # nextbelow(8): float32 log2 rounds to 3.0 (microxcaling python bug -> 8.0); from bits floor = 2 -> s = 0 -> 6
    x = torch.zeros(32)
    x[0] = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0))
    assert fake_quantize(x, "mxfp4")[0].item() == 6.0


def test_nv_two_blocks_hand_check():
    # block 0 amax 6 sets the global amax; block 1 has amax 1 -> pts = 6/2688, s8 = e4m3(74.667) = 72 (byte 105)
    x = torch.zeros(32)
    x[0] = 6.0
    x[16:20] = torch.tensor([1.0, 0.5, -0.25, 0.3])
    for profile in ("compressed_tensors", "torchao", "transformer_engine"):
        q = quantize(x, "nvfp4", profile=profile)
        assert q.scales.float().tolist() == [448.0, 72.0]
        assert q.scales[1].view(torch.uint8).item() == 105
        assert q.codes[16:20].tolist() == [7, 5, 0b1011, 4]  # 6, 3, -1.5, 2
        y = fake_quantize(x, "nvfp4", profile=profile)
        assert abs(y[16].item() - 0.9642857) < 1e-7  # 6 * 72 / 448; atol: the three profiles' product orders
        assert y[0].item() == 6.0


def test_int_symmetric_maps_amax_to_qmax():
    # amax 127.5 -> scale = 127.5 / 127.5 = 1 exactly: +127.5 clamps to 127; -127.5 lies inside [-128, 127] and RNE
    # takes it to -128 (even); 0.5 -> 0 and 1.5 -> 2 (ties to even).
    x = torch.tensor([[127.5, -127.5, 0.5, 1.5]])
    q = quantize(x, "int8")
    k = q.codes.to(torch.int32)
    k = torch.where(k > 127, k - 256, k)
    assert q.scales.tolist() == [[1.0]]
    assert k.tolist() == [[127, -128, 0, 2]]


def test_nf4_ties_go_to_the_lower_level():
    levels = torch.tensor([-1.0, -0.6961928009986877])
    mid = float((levels[0] + levels[1]) / 2)  # the same fp32 midpoint bucketize compares against
    x = torch.zeros(64)
    x[0], x[1] = 1.0, mid  # amax 1 -> normalized == x
    q = quantize(x, "nf4")
    assert q.codes[1].item() == 0  # the tie between code 0 and 1 goes to the lower code
