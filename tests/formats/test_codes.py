"""Exhaustive code tables: every E2M1 / E2M3 / E3M2 / E4M3 / E5M2 / E8M0 / INT / NF4 code decodes to its from-bits
value and re-encodes to itself; packing layout; native float8 cast cross-check.

Run: python -m pytest tests/formats/test_codes.py -q
"""

import math

import pytest
import torch

from quarl.formats import pack_fp4, unpack_fp4
from quarl.formats.codes import decode, encode
from quarl.formats.rounding import round_to_float_grid
from quarl.formats.spec import (
    E2M1, E2M3, E3M2, E4M3, E5M2, INT4, INT8, MXINT8_ELEM, NF4_LEVELS, decode_float_code, e8m0_to_float,
    float_code_table,
)

FLOATS = [E2M1, E2M3, E3M2, E4M3, E5M2]


def test_e2m1_table_is_the_ocp_list():
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    expected = expected + [-v for v in expected]
    assert float_code_table(E2M1).tolist() == expected
    assert math.copysign(1.0, float_code_table(E2M1)[8].item()) == -1.0  # code 8 is -0.0


@pytest.mark.parametrize("spec,native", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_tables_match_torch_native_bits(spec, native):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = codes.view(native).float()
    ours = float_code_table(spec)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    finite = ~torch.isnan(ref)
    assert torch.equal(ours[finite], ref[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(ref[finite]))


@pytest.mark.parametrize("spec", [E2M3, E3M2])
def test_fp6_tables_from_bits(spec):
    # independent formula: normal 2^(E-bias) * (1 + M/2^m), subnormal 2^(1-bias) * M/2^m
    for code in range(64):
        e, m = (code >> spec.mbits) & ((1 << spec.ebits) - 1), code & ((1 << spec.mbits) - 1)
        mag = 2.0 ** (1 - spec.bias) * m / 2**spec.mbits if e == 0 else 2.0 ** (e - spec.bias) * (1 + m / 2**spec.mbits)
        assert decode_float_code(spec, code) == (-mag if code & 32 else mag)
    assert float_code_table(spec).abs().max().item() == spec.max_normal


@pytest.mark.parametrize("spec", FLOATS, ids=lambda s: s.name)
def test_every_finite_code_round_trips(spec):
    table = float_code_table(spec)
    codes = torch.arange(1 << spec.bits, dtype=torch.int32).to(torch.uint8)
    finite = torch.isfinite(table)
    assert torch.equal(encode(table[finite], spec), codes[finite])
    assert torch.equal(decode(codes, spec)[finite], table[finite])
    # grid values are fixed points of the rounding (sign of zero included)
    rounded = round_to_float_grid(table[finite], spec)
    assert torch.equal(rounded, table[finite])
    assert torch.equal(torch.signbit(rounded), torch.signbit(table[finite]))


def test_max_codes():
    assert (E2M1.max_code, E4M3.max_code, E5M2.max_code) == (0x7, 0x7E, 0x7B)


def test_e8m0_all_256_bytes():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = e8m0_to_float(b)
    assert math.isnan(got[255].item())
    ref = torch.tensor([math.ldexp(1.0, i - 127) for i in range(255)], dtype=torch.float32)
    assert torch.equal(got[:255], ref)
    assert got[0].view(torch.int32).item() == 0x00400000  # 2^-127 is the fp32 subnormal, not 0 or 2^-126


@pytest.mark.parametrize("spec", [INT8, INT4, MXINT8_ELEM], ids=lambda s: s.name)
def test_int_codes_twos_complement(spec):
    ks = torch.arange(spec.qmin, spec.qmax + 1, dtype=torch.float32)
    values = ks * spec.step
    codes = encode(values, spec)
    assert torch.equal(codes, (ks.to(torch.int32) & ((1 << spec.bits) - 1)).to(torch.uint8))
    assert torch.equal(decode(codes, spec), values)


def test_nf4_levels_sorted_symmetric_ends():
    lv = torch.tensor(NF4_LEVELS)
    assert lv[0] == -1 and lv[-1] == 1 and lv[7] == 0 and bool((lv[1:] > lv[:-1]).all())


@pytest.mark.parametrize("spec,native", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_rounding_matches_native_float8_cast(spec, native):
    g = torch.Generator().manual_seed(0)
    table = float_code_table(spec)
    grid = table[torch.isfinite(table)].unique()
    mids = (grid[1:] + grid[:-1]) / 2  # every tie
    rand = torch.randn(20000, generator=g) * torch.logspace(-10, 5, 20000, base=2)
    x = torch.cat([grid, mids, rand, torch.nextafter(mids, torch.tensor(float("inf"))),
                   torch.nextafter(mids, torch.tensor(float("-inf")))])
    x = x.clamp(-spec.max_normal, spec.max_normal)  # e5m2's native cast does not saturate
    assert torch.equal(round_to_float_grid(x, spec), x.to(native).float())


def test_pack_layout_even_element_low_nibble():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0]], dtype=torch.uint8)
    packed = pack_fp4(codes)
    assert packed.tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_fp4(packed), codes)


def test_pack_round_trip_and_errors():
    codes = torch.randint(0, 16, (3, 4, 10), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="4-bit"):
        pack_fp4(torch.tensor([16, 0], dtype=torch.uint8))
