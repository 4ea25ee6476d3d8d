"""Element-format constants: the small floating-point grids (E2M1, E2M3, E3M2, E4M3, E5M2), E8M0 and NF4.

Why: every other module in ``quarl.formats`` derives its numbers from these specs instead of repeating magic constants
(the torchao ``mx_formats/constants.py`` / microxcaling ``formats.py`` pattern).

Math: a :class:`FloatSpec` with ``ebits`` exponent bits, ``mbits`` explicit mantissa bits and exponent ``bias`` encodes
the magnitude of code ``c = (E << mbits) | M`` as

* ``E > 0`` (normal):    ``2^(E - bias) * (1 + M / 2^mbits)``
* ``E == 0`` (subnormal): ``2^(1 - bias) * (M / 2^mbits)``

with the sign in bit ``ebits + mbits``. ``max_normal`` is the largest finite value; for E4M3 ("fn") the all-ones code
is NaN (no Inf), for E5M2 the IEEE rules apply (exponent all ones: Inf / NaN). FP4/FP6 have no special values.
E8M0 is an 8-bit biased power-of-two exponent: byte ``b`` encodes ``2^(b - 127)``, byte 255 is NaN.
NF4 is bitsandbytes' fixed 16-level table (``functional.get_4bit_type('nf4')``).

References: OCP Microscaling Formats (MX) v1.0 §5.3; torchao ``prototype/mx_formats/constants.py``;
microxcaling ``mx/formats.py::_get_format_params``; bitsandbytes ``functional.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E8M0_BIAS = 127
E8M0_NAN = 255
F32_MBITS = 23
F32_BIAS = 127


@dataclass(frozen=True)
class FloatSpec:
    """A small IEEE-like floating-point element format (sign bit + ``ebits`` + ``mbits``)."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max_normal: float
    has_inf: bool = False  # E5M2: exponent all-ones, mantissa 0
    has_nan: bool = False  # E4M3fn: only S.1111.111; E5M2: exponent all-ones, mantissa != 0

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal (also the subnormal exponent)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Unbiased exponent of ``max_normal`` = floor(log2(max_normal)) (torchao ``*_MAX_POW2``)."""
        return int(torch.tensor(self.max_normal).log2().floor().item())

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def subnormal_step(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    @property
    def max_code(self) -> int:
        """Largest magnitude code that encodes a finite value (sign bit clear)."""
        return _encode_magnitude_exact(self, self.max_normal)


@dataclass(frozen=True)
class IntSpec:
    """A symmetric signed integer element grid ``[qmin, qmax]`` scaled by ``step`` (MXINT8 uses step 2^-6)."""

    name: str
    bits: int
    qmin: int
    qmax: int
    step: float = 1.0

    @property
    def max_normal(self) -> float:
        return self.qmax * self.step


E2M1 = FloatSpec("e2m1", ebits=2, mbits=1, bias=1, max_normal=6.0)
E2M3 = FloatSpec("e2m3", ebits=2, mbits=3, bias=1, max_normal=7.5)
E3M2 = FloatSpec("e3m2", ebits=3, mbits=2, bias=3, max_normal=28.0)
E4M3 = FloatSpec("e4m3", ebits=4, mbits=3, bias=7, max_normal=448.0, has_nan=True)
E5M2 = FloatSpec("e5m2", ebits=5, mbits=2, bias=15, max_normal=57344.0, has_inf=True, has_nan=True)

# MXINT8 (microxcaling "int8" element): 8-bit two's complement with an implied binary point after 2 bits,
# i.e. values k / 64 for k in [-127, 127] (OCP MX v1.0 §5.3.4; microxcaling clamps to +-127/64).
MXINT8_ELEM = IntSpec("mxint8", bits=8, qmin=-127, qmax=127, step=2.0**-6)
# compressed-tensors INT symmetric ranges: [-128, 127] and [-8, 7] (quantization/utils/helpers.py::_calculate_range).
INT8 = IntSpec("int8", bits=8, qmin=-128, qmax=127)
INT4 = IntSpec("int4", bits=4, qmin=-8, qmax=7)

# bitsandbytes 0.50.2 functional.get_4bit_type("nf4") -- the 16 normal-float levels, ascending, code = index.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

FLOAT_SPECS = {s.name: s for s in (E2M1, E2M3, E3M2, E4M3, E5M2)}


def decode_float_code(spec: FloatSpec, code: int) -> float:
    """Value of one code of ``spec``, straight from its bit fields (the from-bits reference)."""
    sign = -1.0 if (code >> (spec.ebits + spec.mbits)) & 1 else 1.0
    e = (code >> spec.mbits) & ((1 << spec.ebits) - 1)
    m = code & ((1 << spec.mbits) - 1)
    e_all_ones = e == (1 << spec.ebits) - 1
    if spec.has_inf and e_all_ones:
        return sign * float("inf") if m == 0 else float("nan")
    if spec.has_nan and not spec.has_inf and e_all_ones and m == (1 << spec.mbits) - 1:
        return float("nan")
    if e == 0:
        return sign * 2.0 ** spec.emin * (m / 2**spec.mbits)
    return sign * 2.0 ** (e - spec.bias) * (1.0 + m / 2**spec.mbits)


def _encode_magnitude_exact(spec: FloatSpec, value: float) -> int:
    """Code of a non-negative value that lies exactly on the grid (used for constants only)."""
    for code in range(1 << (spec.ebits + spec.mbits)):
        if decode_float_code(spec, code) == value:
            return code
    raise ValueError(f"{value} is not on the {spec.name} grid")


def float_code_table(spec: FloatSpec) -> torch.Tensor:
    """fp32 tensor of the values of all ``2^bits`` codes of ``spec`` (index = code)."""
    return torch.tensor([decode_float_code(spec, c) for c in range(1 << spec.bits)], dtype=torch.float32)


def e8m0_to_float(byte: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> fp32 ``2^(b-127)`` built from bits (exact, incl. 2^-127 = 0x00400000); 255 -> NaN.

    Args:
        byte: uint8 tensor of biased exponents.

    Returns:
        fp32 tensor of the same shape.
    """
    b = byte.to(torch.int32)
    normal = (b << F32_MBITS).view(torch.float32)  # b in [1, 254]: exponent field b, mantissa 0
    sub = torch.full_like(normal, 2.0**-127)  # b == 0: the fp32 subnormal 2^-127 (not 0, not 2^-126)
    out = torch.where(b == 0, sub, normal)
    return torch.where(b == E8M0_NAN, torch.full_like(out, float("nan")), out)
