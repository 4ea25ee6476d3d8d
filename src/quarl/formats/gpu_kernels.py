"""Triton kernels of ``gpu.py`` (imported lazily by ``gpu.kernels()``: this module needs triton).

Triton resolves the helpers of a ``@triton.jit`` function through the module's globals, so they live at module
level here; ``TRITON_INTERPRET=1`` must be set before this module is first imported to run them on CPU.
"""

import triton
import triton.language as tl


@triton.jit
def _pow2(k):  # exact 2^k, int32 k in [-126, 127]
    return ((k + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)

@triton.jit
def _exp2i(k):  # exact 2^k, k in [-149, 127] (fp32 subnormals)
    normal = ((tl.maximum(k, -126) + 127).to(tl.uint32) << 23)
    sub = tl.full(k.shape, 1, tl.uint32) << tl.minimum(tl.maximum(k + 149, 0), 22).to(tl.uint32)
    return tl.where(k >= -126, normal, sub).to(tl.float32, bitcast=True)

@triton.jit
def _rint(t, HALF_AWAY: tl.constexpr):  # non-negative t < 2^23
    if HALF_AWAY:
        return (t + 0.5).to(tl.int32).to(tl.float32)
    return (t + 8388608.0) - 8388608.0

@triton.jit
def _round_float(v, MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr, HALF_AWAY: tl.constexpr):
    vb = v.to(tl.uint32, bitcast=True)
    a = (vb & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    a = tl.where(a > MAXN, MAXN, a)
    e = ((a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127)
    k = MBITS - tl.maximum(e, EMIN)
    q = _rint(a * _pow2(k), HALF_AWAY) * _pow2(-k)
    return (q.to(tl.uint32, bitcast=True) | (vb & 0x80000000)).to(tl.float32, bitcast=True)

@triton.jit
def _round_int(v, LO: tl.constexpr, HI: tl.constexpr, STEP: tl.constexpr, HALF_AWAY: tl.constexpr):
    t = tl.where(v < LO, LO, tl.where(v > HI, HI, v))
    if STEP != 1.0:
        t = t * (1.0 / STEP)
    tb = t.to(tl.uint32, bitcast=True)
    r = _rint((tb & 0x7FFFFFFF).to(tl.float32, bitcast=True), HALF_AWAY)
    r = tl.where(r == 0.0, 0.0, (r.to(tl.uint32, bitcast=True) | (tb & 0x80000000)).to(tl.float32, bitcast=True))
    if STEP != 1.0:
        r = r * STEP
    return r

@triton.jit
def _load_blocks(x_ptr, n_blocks, BLOCK: tl.constexpr, BPP: tl.constexpr):
    rows = tl.program_id(0) * BPP + tl.arange(0, BPP)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = rows[:, None] < n_blocks
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    m = tl.max(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, axis=1)
    return x, offs, mask, m

@triton.jit
def mx_kernel(x_ptr, y_ptr, n_blocks, BLOCK: tl.constexpr, BPP: tl.constexpr, MODE: tl.constexpr,
              EVEN_MBITS: tl.constexpr, P: tl.constexpr, RCP_MAX: tl.constexpr, IS_INT: tl.constexpr,
              MBITS: tl.constexpr, EMIN: tl.constexpr, MAXN: tl.constexpr, STEP: tl.constexpr,
              LO: tl.constexpr, HI: tl.constexpr, HALF_AWAY: tl.constexpr):
    x, offs, mask, m = _load_blocks(x_ptr, n_blocks, BLOCK, BPP)
    bad = m >= 0x7F800000
    if MODE == 3:  # RCEIL
        yb = (m.to(tl.float32, bitcast=True) * RCP_MAX).to(tl.uint32, bitcast=True)
        be = ((yb >> 23) & 0xFF).to(tl.int32)
        biased = tl.where(be == 0, (yb > 0x00400000).to(tl.int32), be + ((yb & 0x7FFFFF) != 0).to(tl.int32))
        byte = tl.minimum(tl.maximum(biased, 0), 254)
    else:
        b = m
        if MODE == 2:  # EVEN
            b = (b + (1 << (22 - EVEN_MBITS))) & (0x1FF << 23)
        s = ((b >> 23) & 0xFF).to(tl.int32) - 127 - P
        if MODE == 1:  # CEIL
            s = s + ((b & 0x7FFFFF) != 0).to(tl.int32)
        byte = tl.minimum(tl.maximum(s, -127), 127) + 127
    a = x * _exp2i(127 - byte)[:, None]
    if IS_INT:
        v = _round_int(a, LO, HI, STEP, HALF_AWAY)
    else:
        v = _round_float(a, MBITS, 0 + EMIN, MAXN, HALF_AWAY)
    y = v * _exp2i(byte - 127)[:, None]
    nan = tl.full(y.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    tl.store(y_ptr + offs, tl.where(bad[:, None], nan, y), mask=mask)

@triton.jit
def nvfp4_kernel(x_ptr, y_ptr, c_ptr, n_blocks, BLOCK: tl.constexpr, BPP: tl.constexpr,
                 PROFILE: tl.constexpr, HALF_AWAY: tl.constexpr):
    # c_ptr: the tensor-level constants computed by torch exactly as eager does (see `_constants`)
    x, offs, mask, m = _load_blocks(x_ptr, n_blocks, BLOCK, BPP)
    bad = m >= 0x7F800000
    b = m.to(tl.float32, bitcast=True)
    zero = tl.zeros(b.shape, tl.float32)
    T, g, h = tl.load(c_ptr) + zero, tl.load(c_ptr + 1) + zero, tl.load(c_ptr + 2) + zero
    if PROFILE == 0:  # compressed_tensors: g = gs
        v = tl.minimum(g * tl.math.div_rn(b, zero + 6.0), 448.0)
        s8 = _round_float(v, 3, -6, 448.0, False)
        s8 = tl.where(s8 == 0.0, 0.125, s8)
        eff = tl.math.div_rn(s8, g)
        q = _round_float(tl.math.div_rn(x, eff[:, None] + tl.zeros(x.shape, tl.float32)), 1, 0, 6.0, HALF_AWAY)
        y = q * eff[:, None]
    elif PROFILE == 1:  # torchao: g = pts, h = 1 / pts
        v = tl.math.div_rn(tl.math.div_rn(b, zero + 6.0), g)
        s8 = _round_float(tl.minimum(tl.maximum(v, 0.015625), 448.0), 3, -6, 448.0, False)
        q = _round_float(x * tl.math.div_rn(h, s8)[:, None], 1, 0, 6.0, HALF_AWAY)
        y = q * (g * s8)[:, None]
    else:  # transformer_engine: g = S_enc * fp32(1/6), h = S_dec
        s8 = _round_float(b * g, 3, -6, 448.0, False)
        enc = tl.minimum(tl.math.div_rn(zero + 1.0, s8 * h), 3.4028234663852886e38)
        q = _round_float(x * enc[:, None], 1, 0, 6.0, HALF_AWAY)
        y = q * ((s8 * T) * tl.load(c_ptr + 3))[:, None]
    nan = tl.full(y.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)
    tl.store(y_ptr + offs, tl.where(bad[:, None], nan, y), mask=mask)
