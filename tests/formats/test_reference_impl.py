"""quarl.formats' bit-manipulation path vs the slow, obviously-correct ``quarl.formats.reference`` (exhaustive
nearest-value search, frexp scale exponents, scalar float32 NVFP4 arithmetic), compared with ``torch.equal``.

Run: python -m pytest tests/formats/test_reference_impl.py -q
"""

import pytest
import torch

from quarl.formats import fake_quantize
from quarl.formats import reference as ref
from quarl.formats.rounding import RoundingMode, round_to_float_grid
from quarl.formats.spec import E2M1, E2M3, E3M2, E4M3, E5M2, float_code_table

SPECS = {"mxfp4": E2M1, "mxfp6_e2m3": E2M3, "mxfp6_e3m2": E3M2, "mxfp8_e4m3": E4M3, "mxfp8_e5m2": E5M2}


def _adversarial(seed=0):
    """8 blocks of 32: random over decades, exact ties, boundary maxima, fp32 subnormals, huge values."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(32, generator=g) * 10 ** torch.randint(-6, 6, (1,), generator=g).item() for _ in range(3)]
    grid = float_code_table(E2M1)[:8]
    ties = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, -grid, -(grid[1:] + grid[:-1]) / 2, torch.zeros(2)])
    rows.append(ties[:32] * 4.0)  # amax 24 -> FLOOR scale 4: exact ties at scale 4
    rows.append(torch.tensor([7.0, 7.5, 8.0, 28.0, 448.0, 470.0, 480.0, 57344.0] * 4) * torch.randn(32, generator=g).sign())
    rows.append(torch.randn(32, generator=g) * 2.0**-130)  # fp32 subnormal block
    rows.append(torch.randn(32, generator=g) * 2.0**120)  # huge block
    nb = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)).item()
    rows.append(torch.tensor([nb, 6.0, 0.1] * 10 + [0.0, -0.0]))
    return torch.stack(rows)


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("half_away", [False, True])
def test_element_rounding_matches_lut_search(spec, half_away):
    g = torch.Generator().manual_seed(1)
    table = float_code_table(spec)
    grid = table[torch.isfinite(table)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, torch.randn(4000, generator=g) * spec.max_normal / 3, grid * 1.5])
    mode = RoundingMode.HALF_AWAY if half_away else RoundingMode.NEAREST_EVEN
    assert torch.equal(round_to_float_grid(x, spec, mode), ref.round_lut(x, spec, half_away))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("mode", ["floor", "ceil", "even", "rceil"])
def test_mx_matches_reference(name, mode):
    x = _adversarial()
    ours = fake_quantize(x, name, scale_mode=mode)
    theirs = ref.mx_fake_quantize(x, SPECS[name], mode)
    assert torch.equal(ours, theirs)


def test_mx_half_away_matches_reference():
    x = _adversarial(2)
    assert torch.equal(fake_quantize(x, "mxfp4", rounding="half_away"),
                       ref.mx_fake_quantize(x, E2M1, "floor", half_away=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_nvfp4_ct_matches_scalar_reference(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 2, 8).unsqueeze(1)
    x[0, :16] = 0.0  # zero block -> 0.125 eps scale
    x[1, :16] = 1e-9  # block scale underflows the E4M3 grid
    assert torch.equal(fake_quantize(x, "nvfp4"), ref.nvfp4_ct_fake_quantize(x))
