"""C source of the native CPU fake-quantization kernel (built and loaded by ``native.py``).

Why a Python string: it ships with every install of the package (no package-data rule needed) and its hash is the
build cache key. The C is a line-by-line transcription of the eager numerics, one fused pass per block:

* ``round_float_grid``  = ``rounding.round_to_float_grid`` (RNE via ``rintf`` or half-away ``floorf(t + 0.5f)``)
* ``round_int_grid``    = ``rounding.round_to_int_grid``
* ``mx_byte``           = ``mx.scale_exponent`` (FLOOR / CEIL / EVEN / RCEIL from the fp32 bits)
* ``quarl_nvfp4``       = ``nvfp4.quantize_blocks`` for the three profiles, each in its own operation order

Bit-exactness rests on: every operation is one correctly rounded IEEE fp32 op in the same order as torch's eager
kernels (``-ffp-contract=off``: no FMA contraction; no ``-ffast-math``), powers of two built from bits, and the
default rounding mode. The contract is checked by tests/formats/test_native.py against ``fake_quantize_eager``.

Return codes: 0 = done; 1 = "use the eager path" (inputs whose eager result depends on NaN propagation through
tensor-level constants, e.g. a non-finite tensor under ``nonfinite="reference"`` or torchao's all-zero 0/0).
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <float.h>

#define QNAN_POS 0x7fc00000u /* torch's full_like(nan): positive quiet NaN */
#define CHUNK 64 /* NVFP4 blocks per scale pass */

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float pow2(int k) { return u2f((uint32_t)(k + 127) << 23); }      /* k in [-126, 127] */
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

/* max |x| over n elements as an integer max of the sign-cleared bits (the fp order for non-NaN values, and it
   vectorizes); *bad = 1 when any element is NaN or +-Inf (bits >= 0x7F800000) */
static inline uint32_t amax_bits(const float* x, int64_t n) {
    uint32_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t a = f2u(x[k]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* finite max and max over everything, of the sign-cleared bits of x[0..n) (a plain loop: it vectorizes) */
static void amax_range(const float* restrict x, int64_t n, uint32_t* fin_max, uint32_t* all_max) {
    uint32_t m = 0, mall = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t a = f2u(x[i]) & 0x7FFFFFFFu;
        uint32_t fin = a & (0u - (uint32_t)(a < 0x7F800000u)); /* a if finite, else 0 (branch-free) */
        m = fin > m ? fin : m;
        mall = a > mall ? a : mall;
    }
    *fin_max = m;
    *all_max = mall;
}

static inline float block_amax(const float* x, int64_t n, int* bad) {
    /* constant trip counts for the common full blocks: one or two vector iterations, no loop overhead */
    uint32_t m = n == 16 ? amax_bits(x, 16) : (n == 32 ? amax_bits(x, 32) : amax_bits(x, n));
    *bad = m >= 0x7F800000u;
    return u2f(m);
}

static inline void fill_nan(float* y, int64_t n) {
    float q = u2f(QNAN_POS);
    for (int64_t k = 0; k < n; k++) y[k] = q;
}

int quarl_mx(const float* restrict x, float* restrict y, int64_t rows, int64_t len, int64_t block, int mode, int even_mbits, int p,
             float rcp_max, int is_int, int mbits, int emin, float maxn, float step, float lo, float hi,
             int half_away, int nthreads) {
    int64_t nb = (len + block - 1) / block;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t j = 0; j < nb; j++) {
            const float* xs = x + r * len + j * block;
            float* ys = y + r * len + j * block;
            int64_t n = len - j * block < block ? len - j * block : block;
            int bad;
            float amax = block_amax(xs, n, &bad);
            if (bad) { fill_nan(ys, n); continue; }
            int byte = mx_byte(amax, mode, even_mbits, p, rcp_max);
            float sc = exp2i(127 - byte), dq = exp2i(byte - 127);
            if (is_int) {
                for (int64_t k = 0; k < n; k++) ys[k] = round_int_grid(xs[k] * sc, lo, hi, step, half_away) * dq;
            } else if (half_away) {
                for (int64_t k = 0; k < n; k++) ys[k] = round_float_grid(xs[k] * sc, mbits, emin, maxn, 1) * dq;
            } else if (n == 32 && mbits == 1 && emin == 0) { /* mxfp4 full block: constants folded */
                for (int k = 0; k < 32; k++) ys[k] = round_float_grid(xs[k] * sc, 1, 0, 6.0f, 0) * dq;
            } else {
                for (int64_t k = 0; k < n; k++) ys[k] = round_float_grid(xs[k] * sc, mbits, emin, maxn, 0) * dq;
            }
        }
    }
    return 0;
}

static inline float e4m3(float v) { return round_float_grid(v, 3, -6, 448.0f, 0); }
static inline float e2m1(float v, int half_away) { return round_float_grid(v, 1, 0, 6.0f, half_away); }

/* profile 0 compressed_tensors, 1 torchao, 2 transformer_engine; policy_block 1 = block-local non-finite policy */
int quarl_nvfp4(const float* restrict x, float* restrict y, int64_t rows, int64_t len, int64_t block, int profile, int policy_block,
                int has_t, float t_in, int half_away, int nthreads) {
    int64_t numel = rows * len;
    float T = t_in;
    if (!has_t) {
        uint32_t m = 0, mall = 0; /* finite max and max over all (NaN / Inf bits are above every finite) */
        int64_t nparts = (numel + 65535) / 65536;
        #pragma omp parallel for reduction(max : m, mall) schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t c = 0; c < nparts; c++) {
            uint32_t fm, am;
            int64_t lo = c * 65536;
            amax_range(x + lo, numel - lo < 65536 ? numel - lo : 65536, &fm, &am);
            m = fm > m ? fm : m;
            mall = am > mall ? am : mall;
        }
        if (mall >= 0x7F800000u && !policy_block) return 1;
        T = u2f(m);
    }
    float gs = 1.0f, pts = 0.0f, rp = 0.0f, senc = 1.0f, sdec = 1.0f;
    const float c6 = (float)(1.0 / 6.0), c2688 = (float)(1.0 / 2688.0);
    if (profile == 0) {
        float tc = T < FLT_MIN ? FLT_MIN : T;
        gs = (1.0f / tc) * 2688.0f;
        if (!(fabsf(gs) <= FLT_MAX)) gs = 1.0f;
    } else if (profile == 1) {
        pts = T / 2688.0f;
        if (pts == 0.0f) return 1;
        rp = 1.0f / pts;
        if (!(rp <= FLT_MAX)) return 1;
    } else {
        senc = 2688.0f / T;
        senc = senc > FLT_MAX ? FLT_MAX : senc;
        if (T == 0.0f || senc == 0.0f) senc = 1.0f;
        sdec = 1.0f / senc;
    }
    int64_t nb = (len + block - 1) / block;
    int64_t nchunks = (nb + CHUNK - 1) / CHUNK;
    int eager = 0; /* a non-finite block under the reference policy (static T): the eager path decides */
    #pragma omp parallel for collapse(2) reduction(| : eager) schedule(static) num_threads(nthreads) \
        if (nthreads > 1)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < nchunks; c++) {
            /* three passes over a chunk of blocks, so that the per-block scale arithmetic (divisions, the E4M3
               rounding) runs vectorized across blocks instead of as a serial chain per block */
            float b[CHUNK], mul[CHUNK], dq[CHUNK];
            uint32_t bad[CHUNK];
            int64_t j0 = c * CHUNK, nj = nb - j0 < CHUNK ? nb - j0 : CHUNK;
            for (int64_t j = 0; j < nj; j++) {
                int64_t off = (j0 + j) * block, n = len - off < block ? len - off : block;
                int nf;
                b[j] = block_amax(x + r * len + off, n, &nf);
                bad[j] = nf;
            }
            if (profile == 0) {
                for (int64_t j = 0; j < nj; j++) {
                    float v = gs * (b[j] / 6.0f);
                    v = v > 448.0f ? 448.0f : v;
                    float s8 = e4m3(v);
                    s8 = s8 == 0.0f ? 0.125f : s8;
                    mul[j] = s8 / gs; /* eff: x / eff, then * eff */
                    dq[j] = mul[j];
                }
            } else if (profile == 1) {
                for (int64_t j = 0; j < nj; j++) {
                    float v = (b[j] / 6.0f) / pts;
                    v = v < 0.015625f ? 0.015625f : (v > 448.0f ? 448.0f : v);
                    float s8 = e4m3(v);
                    mul[j] = rp / s8;
                    dq[j] = pts * s8;
                }
            } else {
                for (int64_t j = 0; j < nj; j++) {
                    float s8 = e4m3(b[j] * (senc * c6));
                    float enc = 1.0f / (s8 * sdec);
                    mul[j] = enc > FLT_MAX ? FLT_MAX : enc;
                    dq[j] = (s8 * T) * c2688;
                }
            }
            for (int64_t j = 0; j < nj; j++) {
                int64_t off = (j0 + j) * block, n = len - off < block ? len - off : block;
                const float* xs = x + r * len + off;
                float* ys = y + r * len + off;
                if (bad[j]) { eager |= !policy_block; fill_nan(ys, n); continue; }
                float m = mul[j], d = dq[j];
                if (n == 16 && !half_away) {
                    if (profile == 0) { for (int k = 0; k < 16; k++) ys[k] = e2m1(xs[k] / m, 0) * d; }
                    else { for (int k = 0; k < 16; k++) ys[k] = e2m1(xs[k] * m, 0) * d; }
                } else if (profile == 0) {
                    for (int64_t k = 0; k < n; k++) ys[k] = e2m1(xs[k] / m, half_away) * d;
                } else {
                    for (int64_t k = 0; k < n; k++) ys[k] = e2m1(xs[k] * m, half_away) * d;
                }
            }
        }
    }
    return eager;
}
"""
