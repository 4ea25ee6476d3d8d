"""C source of the native CPU fake-quantization kernel (built and loaded by ``native.py``).

Why a Python string: it ships with every install of the package (no package-data rule needed) and its hash is the
build cache key. The C is a transcription of the eager numerics:

* ``round_float_grid``  = ``rounding.round_to_float_grid`` (RNE via ``rintf`` or half-away ``floorf(t + 0.5f)``)
* ``round_int_grid``    = ``rounding.round_to_int_grid``
* ``mx_byte``           = ``mx.scale_exponent`` (FLOOR / CEIL / EVEN / RCEIL from the fp32 bits)
* ``quarl_nvfp4_fq``    = ``nvfp4.quantize_blocks`` for the three profiles, each in its own operation order

Speed: the element loops run on explicit 8-lane vectors (GCC / Clang vector extensions; AVX2 min / max and an
8-block amax transpose with ``-march=native`` on x86, the same code in portable form elsewhere or under
``QUARL_PORTABLE``): GCC fully unrolls the 16- and 32-element scalar loops and then leaves them scalar (~5 ns per
element, 15-30x a clone). Blocks go in chunks of 64 (amax pass, vectorized scale pass, element pass); RNE is the exact
magic-number form ``(a + C) - C``; MXFP4's common blocks round in the unscaled domain (exactly the same values, see
``e2m1_block_consts``); the NVFP4 kernel (``native_nvfp4_source.py``) keeps the tensor amax pass's block amaxes for
the quantize pass, both passes in one OpenMP region; one thread runs without OpenMP.

Bit-exactness rests on: every operation is one correctly rounded IEEE fp32 op in the same order as torch's eager
kernels (``-ffp-contract=off``: no FMA contraction; no ``-ffast-math``), or a rewrite proven to give the same value
(each says why where it stands), powers of two built from bits, and the default rounding mode. The contract is checked
by tests/formats/test_native.py against ``fake_quantize_eager``, for the AVX2 and the portable build.

Return codes: 0 = done; 1 = "use the eager path" (inputs whose eager result depends on NaN propagation through
tensor-level constants, e.g. a non-finite tensor under ``nonfinite="reference"`` or torchao's all-zero 0/0).
"""

from .native_nvfp4_source import NVFP4_SOURCE

_COMMON_MX = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include <stdlib.h>

#define QNAN_POS 0x7fc00000u /* torch's full_like(nan): positive quiet NaN */
#define CHUNK 64 /* blocks per chunk (a multiple of 8): amax pass, scale pass, element pass */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float exp2i(int k) {                                                /* k in [-149, 127] */
    if (k >= -126) return u2f((uint32_t)(k + 127) << 23);
    int s = k + 149;
    s = s < 0 ? 0 : (s > 22 ? 22 : s);
    return u2f(1u << s);
}

/* finite or +-Inf v (NaN never reaches here); Inf saturates like clamp(max=maxn). Branch-free, so that the
   element loops vectorize; copysign(q, v) with q >= +0 is an OR of v's sign bit. */
static inline float round_float_grid(float v, int mbits, int emin, float maxn, int half_away) {
    uint32_t vb = f2u(v);
    float a = u2f(vb & 0x7FFFFFFFu);
    a = a > maxn ? maxn : a;
    int e = (int)(f2u(a) >> 23) - 127;
    e = e < emin ? emin : e;
    int k = mbits - e;
    float t = a * u2f((uint32_t)(k + 127) << 23);
    float r = half_away ? floorf(t + 0.5f) : rintf(t);
    float q = r * u2f((uint32_t)(127 - k) << 23);
    return u2f(f2u(q) | (vb & 0x80000000u));
}

static inline float round_int_grid(float v, float lo, float hi, float step, int half_away) {
    float t = v < lo ? lo : (v > hi ? hi : v);
    if (step != 1.0f) t = t * (1.0f / step);
    uint32_t tb = f2u(t);
    float at = u2f(tb & 0x7FFFFFFFu);
    float r = half_away ? floorf(at + 0.5f) : rintf(at);
    r = r == 0.0f ? 0.0f : u2f(f2u(r) | (tb & 0x80000000u)); /* integers have no -0 */
    return step != 1.0f ? r * step : r;
}

/* ---- 8-lane vectors (GCC / Clang vector extensions: AVX2 under -march=native, 2 x SSE2 / NEON otherwise) ----
   The element loops run on explicit vectors: GCC fully unrolls the 16- and 32-trip scalar loops and then leaves
   them scalar (vroundss, ~5 ns per element, 15-30x a clone). Each vector function is its scalar twin above, lane by
   lane, with the same fp32 operations in the same order. rint(t) is the exact magic-number form
   (t + 1.5 * 2^23) - 1.5 * 2^23, which is RNE for 0 <= t < 2^22 (here t < 2^(mbits + 1)); floor(s) for
   0 <= s < 2^22 is rint(s) - [rint(s) > s]. Integer compares of sign-cleared bits order non-NaN floats. */
#define VW 8
typedef float vf __attribute__((vector_size(4 * VW)));
typedef int32_t vi __attribute__((vector_size(4 * VW)));
#define RNE_MAGIC 12582912.0f

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, vf v) { memcpy(p, &v, sizeof v); }
static inline vi vloadi(const uint32_t* p) { vi v; memcpy(&v, p, sizeof v); return v; }
static inline vf vsplat(float f) { vf v; for (int l = 0; l < VW; l++) v[l] = f; return v; }
static inline vi vsel(vi m, vi a, vi b) { return (m & a) | (~m & b); } /* per lane: m ? a : b (m is 0 / -1) */
#if defined(__AVX2__) && !defined(QUARL_PORTABLE)
#include <immintrin.h>
static inline vi vmax(vi a, vi b) { return (vi)_mm256_max_epi32((__m256i)a, (__m256i)b); }
static inline vi vmin(vi a, vi b) { return (vi)_mm256_min_epi32((__m256i)a, (__m256i)b); }
#else /* the same lane-wise int32 max / min, for any target (tests build this variant too) */
static inline vi vmax(vi a, vi b) { return vsel(a > b, a, b); }
static inline vi vmin(vi a, vi b) { return vsel(a < b, a, b); }
#endif

/* non-temporal stores for outputs far larger than the cache: a plain store first reads the line it writes (the
   read-for-ownership), so a regular element pass moves 3 bytes per output byte where a streaming one moves 2 (4096^2
   fp32, 1 thread: 6.9 ms vs 4.0 ms for the same pass here). Only 32-byte-aligned vectors; stream_fence() orders them
   before the kernel returns. Values are unaffected (the same lanes are stored). */
#if defined(__AVX2__) && !defined(QUARL_PORTABLE)
static inline void vstream(float* p, vf v) { _mm256_stream_ps(p, (__m256)v); }
static inline void stream_fence(void) { _mm_sfence(); }
#else
static inline void vstream(float* p, vf v) { vstore(p, v); }
static inline void stream_fence(void) {}
#endif

static inline vf vself(vi m, vf a, vf b) { return (vf)vsel(m, (vi)a, (vi)b); }

static inline vf vround_float_grid(vf v, int mbits, int emin, float maxn, int half_away) {
    vi vb = (vi)v, av = vb & 0x7FFFFFFF;
    vi sign = vb ^ av; /* (no sign-mask constant: one register fewer in the unrolled loops) */
    vi ab = vmin(av, (vi){0} + (int32_t)f2u(maxn)); /* a = min(|v|, maxn) */
    vi eb = vmax(ab & 0x7F800000, (vi){0} + ((emin + 127) << 23)); /* (max(e, emin) + 127) << 23 */
    vf r;
    if (half_away) {
        vi k = mbits + 127 - (eb >> 23);
        vf t = (vf)ab * (vf)((k + 127) << 23);
        vf s = t + 0.5f;
        r = (s + RNE_MAGIC) - RNE_MAGIC;
        r = r - (vf)((r > s) & 0x3F800000);                /* floor: one less where rint rounded up */
        r = r * (vf)((127 - k) << 23);
    } else {
        /* rint(a * 2^k) * 2^-k with k = mbits - e is the RNE of a onto multiples of u = 2^(e - mbits), which is
           (a + C) - C for C = 1.5 * 2^23 * u (C's ulp is u, C / u is even, and a < 2^(e+1) <= 2^23 * u): the same
           exact value in two operations instead of four */
        vf c = (vf)(eb + (((23 - mbits) << 23) | 0x400000));
        r = ((vf)ab + c) - c;
    }
    return (vf)((vi)r | sign);
}

/* ys = grid(xs * mul) * dq (or xs / mul: the compressed-tensors order) over one block of n elements */
static inline void fq_block(const float* restrict xs, float* restrict ys, int64_t n, float mul, float dq, int div,
                            int mbits, int emin, float maxn, int half_away) {
    int64_t k = 0;
    for (; k + VW <= n; k += VW) {
        vf v = vload(xs + k);
        v = div ? v / mul : v * mul;
        vstore(ys + k, vround_float_grid(v, mbits, emin, maxn, half_away) * dq);
    }
    for (; k < n; k++) ys[k] = round_float_grid(div ? xs[k] / mul : xs[k] * mul, mbits, emin, maxn, half_away) * dq;
}

/* The RNE rounding's lane constants, built once per chunk and hidden from the optimizer (OPAQUE): GCC otherwise
   rebuilds every splat inside the block loop (mov + vmovd + vpbroadcastd each: 18 of ~50 instructions per block) */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define OPAQUE(v) __asm__("" : "+x"(v))
#else
#define OPAQUE(v) ((void)0)
#endif
typedef struct { vi abs, maxb, expm, eminb, k; } grid_k;

static inline grid_k grid_consts(int mbits, int emin, float maxn) {
    grid_k c = {(vi){0} + 0x7FFFFFFF, (vi){0} + (int32_t)f2u(maxn), (vi){0} + 0x7F800000,
                (vi){0} + ((emin + 127) << 23), (vi){0} + (((23 - mbits) << 23) | 0x400000)};
    OPAQUE(c.abs); OPAQUE(c.maxb); OPAQUE(c.expm); OPAQUE(c.eminb); OPAQUE(c.k);
    return c;
}

/* vround_float_grid(v, mbits, emin, maxn, 0) with its constants from c (the same operations) */
static inline vf vround_k(vf v, const grid_k* c) {
    vi vb = (vi)v, av = vb & c->abs;
    vi ab = vmin(av, c->maxb);
    vf cc = (vf)(vmax(ab & c->expm, c->eminb) + c->k);
    vf r = ((vf)ab + cc) - cc;
    return (vf)((vi)r | (vb ^ av));
}

/* fq_block for RNE over n (a multiple of VW) elements; nt: streaming stores (ys 32-byte aligned) */
static inline void fq_block_k(const float* restrict xs, float* restrict ys, int64_t n, float mul, float dq, int div,
                              const grid_k* c, int nt) {
    for (int64_t k = 0; k < n; k += VW) { /* (scalar operands: GCC broadcasts them from memory) */
        vf v = vload(xs + k);
        v = vround_k(div ? v / mul : v * mul, c) * dq;
        if (nt) vstream(ys + k, v);
        else vstore(ys + k, v);
    }
}

/* E8M0 byte of a finite block amax (mode 0 floor, 1 ceil, 2 even, 3 rceil) */
static inline int mx_byte(float amax, int mode, int even_mbits, int p, float rcp_max) {
    if (mode == 3) {
        uint32_t yb = f2u(amax * rcp_max);
        int be = (int)((yb >> 23) & 0xFF);
        int biased = be == 0 ? (yb > 0x00400000u) : be + ((yb & 0x7FFFFFu) != 0);
        return biased < 0 ? 0 : (biased > 254 ? 254 : biased);
    }
    uint32_t b = f2u(amax);
    if (mode == 2) b = (b + (1u << (22 - even_mbits))) & (0x1FFu << 23);
    int s = (int)((b >> 23) & 0xFF) - 127 - p;
    if (mode == 1) s += (b & 0x7FFFFFu) != 0;
    s = s < -127 ? -127 : (s > 127 ? 127 : s);
    return s + 127;
}

/* max |x| over n elements as an integer max of the sign-cleared bits (the fp order for non-NaN values; NaN and
   +-Inf bits are >= 0x7F800000, above every finite) */
static inline uint32_t amax_bits(const float* x, int64_t n) {
    vi mv = {0};
    int64_t k = 0;
    for (; k + VW <= n; k += VW) mv = vmax((vi)vload(x + k) & 0x7FFFFFFF, mv);
    uint32_t m = 0;
    for (int l = 0; l < VW; l++) m = (uint32_t)mv[l] > m ? (uint32_t)mv[l] : m;
    for (; k < n; k++) {
        uint32_t a = f2u(x[k]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* amax_bits of 8 consecutive full blocks of `block` (a multiple of VW) elements. With AVX2 the 8 horizontal
   reductions are one transpose-and-max tree (21 instead of ~60 instructions) */
static inline void amax8(const float* x, int64_t block, uint32_t* out) {
#if defined(__AVX2__) && !defined(QUARL_PORTABLE)
    __m256i m[8], t[4], u[2];
    for (int b = 0; b < 8; b++) {
        vi mv = (vi)vload(x + b * block) & 0x7FFFFFFF;
        for (int64_t k = VW; k < block; k += VW) mv = vmax(mv, (vi)vload(x + b * block + k) & 0x7FFFFFFF);
        m[b] = (__m256i)mv;
    }
    for (int i = 0; i < 4; i++) /* lanes {0,2}, {1,3} of blocks 2i, 2i+1 (per 128-bit half) */
        t[i] = _mm256_max_epi32(_mm256_unpacklo_epi32(m[2 * i], m[2 * i + 1]),
                                _mm256_unpackhi_epi32(m[2 * i], m[2 * i + 1]));
    for (int i = 0; i < 2; i++) /* blocks 4i..4i+3, one lane each per half */
        u[i] = _mm256_max_epi32(_mm256_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm256_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    _mm256_storeu_si256((__m256i*)out, _mm256_max_epi32(_mm256_permute2x128_si256(u[0], u[1], 0x20),
                                                         _mm256_permute2x128_si256(u[0], u[1], 0x31)));
#else
    for (int b = 0; b < 8; b++) out[b] = amax_bits(x + b * block, block);
#endif
}

/* amax bits of blocks j0 .. j0+nj of one row of len elements (the last block may be partial) */
static inline void chunk_amax(const float* xr, int64_t len, int64_t block, int64_t j0, int64_t nj, uint32_t* bits) {
    int64_t j = 0;
    if (block % VW == 0) {
        for (; j + 8 <= nj && (j0 + j + 8) * block <= len; j += 8) {
            const float* xs = xr + (j0 + j) * block;
            if (block == 16) amax8(xs, 16, bits + j);      /* constant trips for the common blocks */
            else if (block == 32) amax8(xs, 32, bits + j);
            else amax8(xs, block, bits + j);
        }
    }
    for (; j < nj; j++) {
        int64_t off = (j0 + j) * block;
        bits[j] = amax_bits(xr + off, len - off < block ? len - off : block);
    }
}

/* max of the sign-cleared bits of the finite elements of x[0..n) (0 when none) */
static uint32_t finite_amax_bits(const float* x, int64_t n) {
    uint32_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
        m = a < 0x7F800000u && a > m ? a : m;
    }
    return m;
}

static inline void fill_nan(float* y, int64_t n) {
    float q = u2f(QNAN_POS);
    for (int64_t k = 0; k < n; k++) y[k] = q;
}

/* vround_k with these constants is E2M1 grid(|x| * 2^(127-byte)) * 2^(byte-127), sign restored, without the two
   scalings: for 1 <= byte <= 230 the RNE of |x| onto the block's own grid, min(|x|, 6 * 2^(byte-127)) rounded to
   multiples of 2^(max(e, byte-127) - 1), is exactly the same value (the scalings are exact there: powers of two with
   normal results; where |x| * 2^(127-byte) would underflow, both round to a signed zero; above 230 the constant C
   would overflow) in two fewer operations */
static inline grid_k e2m1_block_consts(const grid_k* c, int byte) {
    grid_k b = *c; /* c: grid_consts(1, 0, 6.0f); this block's clamp and exponent floor, unscaled */
    b.maxb = (vi){0} + (int32_t)(f2u(6.0f) + ((uint32_t)(byte - 127) << 23));
    b.eminb = (vi){0} + (byte << 23);
    return b;
}

/* full MXFP4 blocks with RNE (mxfp4's common case, specialized; nt: streaming stores, called with a constant) */
static inline void mx_run32(const float* restrict xs, float* restrict ys, int64_t nj, const uint32_t* bits, int mode,
                            int even_mbits, int p, float rcp_max, int nt) {
    grid_k c = grid_consts(1, 0, 6.0f);
    for (int64_t j = 0; j < nj; j++) {
        const float* xb = xs + 32 * j;
        float* yb = ys + 32 * j;
        if (bits[j] >= 0x7F800000u) { fill_nan(yb, 32); continue; } /* a NaN / Inf in the block */
        int byte = mx_byte(u2f(bits[j]), mode, even_mbits, p, rcp_max);
        if (byte >= 1 && byte <= 230) {
            grid_k b = e2m1_block_consts(&c, byte);
            for (int k = 0; k < 32; k += VW) {
                if (nt) vstream(yb + k, vround_k(vload(xb + k), &b));
                else vstore(yb + k, vround_k(vload(xb + k), &b));
            }
        } else {
            fq_block_k(xb, yb, 32, exp2i(127 - byte), exp2i(byte - 127), 0, &c, nt);
        }
    }
}

/* the kernels' per-format constants, one struct built once per format by native.py (a call then converts 6 ctypes
   arguments instead of 18: ~3 us less) */
typedef struct { int64_t block; int32_t mode, even_mbits, p; float rcp_max; int32_t is_int, mbits, emin;
                 float maxn, step, lo, hi; int32_t half_away; } mx_params;
typedef struct { int64_t block; int32_t profile, policy_block, has_t; float t; int32_t half_away; } nv_params;

/* chunk i of a rows x nchunks grid of CHUNK-block chunks: its row offset and its first block and block count */
#define CHUNK_AT(i) \
    int64_t ro = ((i) / nchunks) * len, j0 = ((i) % nchunks) * CHUNK, nj = nb - j0 < CHUNK ? nb - j0 : CHUNK

static inline void mx_chunk(const float* restrict xr, float* restrict yr, int64_t len, int64_t j0, int64_t nj,
                            const mx_params* a, int nt) {
    uint32_t bits[CHUNK];
    int64_t block = a->block;
    chunk_amax(xr, len, block, j0, nj, bits);
    if (block == 32 && !a->is_int && a->mbits == 1 && a->emin == 0 && !a->half_away && (j0 + nj) * 32 <= len) {
        if (nt) mx_run32(xr + j0 * 32, yr + j0 * 32, nj, bits, a->mode, a->even_mbits, a->p, a->rcp_max, 1);
        else mx_run32(xr + j0 * 32, yr + j0 * 32, nj, bits, a->mode, a->even_mbits, a->p, a->rcp_max, 0);
        return; /* mxfp4 full blocks, RNE: the common case, specialized */
    }
    for (int64_t j = 0; j < nj; j++) {
        int64_t off = (j0 + j) * block, n = len - off < block ? len - off : block;
        const float* xs = xr + off;
        float* ys = yr + off;
        if (bits[j] >= 0x7F800000u) { fill_nan(ys, n); continue; } /* a NaN / Inf in the block */
        int byte = mx_byte(u2f(bits[j]), a->mode, a->even_mbits, a->p, a->rcp_max);
        float sc = exp2i(127 - byte), dq = exp2i(byte - 127);
        if (a->is_int) {
            for (int64_t k = 0; k < n; k++)
                ys[k] = round_int_grid(xs[k] * sc, a->lo, a->hi, a->step, a->half_away) * dq;
        } else {
            fq_block(xs, ys, n, sc, dq, 0, a->mbits, a->emin, a->maxn, a->half_away);
        }
    }
}

/* streaming stores only where every vector store is 32-byte aligned: one flat run of blocks from an aligned y */
static inline int stream_ok(const float* y, int64_t rows, int nt) {
    return nt && rows == 1 && ((uintptr_t)y & 31) == 0;
}

/* MX fake quantization of rows x len fp32 (blocks along len); one thread calls no OpenMP at all (~1 us less); nt:
   streaming stores (for outputs far larger than the cache) */
int quarl_mx_fq(const float* x, float* y, int64_t rows, int64_t len, const mx_params* a, int nthreads, int nt) {
    int64_t nb = (len + a->block - 1) / a->block, nchunks = (nb + CHUNK - 1) / CHUNK;
    nt = stream_ok(y, rows, nt);
    if (nthreads > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            #pragma omp for schedule(static) nowait
            for (int64_t i = 0; i < rows * nchunks; i++) { CHUNK_AT(i); mx_chunk(x + ro, y + ro, len, j0, nj, a, nt); }
            if (nt) stream_fence(); /* each thread its own stores, before the region's closing barrier */
        }
    } else {
        for (int64_t i = 0; i < rows * nchunks; i++) { CHUNK_AT(i); mx_chunk(x + ro, y + ro, len, j0, nj, a, nt); }
        if (nt) stream_fence();
    }
    return 0;
}
"""

SOURCE = _COMMON_MX + NVFP4_SOURCE  # one translation unit, one build, one cache key
