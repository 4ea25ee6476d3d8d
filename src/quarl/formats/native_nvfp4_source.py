"""C source of the native kernel's NVFP4 part (``quarl_nvfp4_fq``); ``native_source.SOURCE`` appends it to the
shared numerics and the MX kernel, which it uses (vector layer, block amaxes, ``CHUNK_AT``, ``nv_params``).

``nvfp4.quantize_blocks`` per profile (0 compressed_tensors, 1 torchao, 2 transformer_engine, 3 vllm), in two passes over chunks of 64 blocks: the tensor amax (the block amaxes are
kept), then per chunk the per-block multipliers on vectors across blocks and the element loop. Same contract as
``native_source``: bit-identical to ``fake_quantize_eager``, checked by tests/formats/test_native.py.
"""

NVFP4_SOURCE = r"""
static inline vf e4m3v(vf v) { return vround_float_grid(v, 3, -6, 448.0f, 0); }

/* the three NVFP4 profiles' per-block multipliers from block amaxes b, 8 blocks at a time (nvfp4.quantize_blocks,
   each profile in its own operation order; lanes of non-finite blocks compute garbage that is never used) */
static inline void nv_scales(const uint32_t* bits, int64_t nj, int profile, float T, float gs, float pts, float rp,
                             float senc, float sdec, float* mul, float* dq) {
    const float c6 = (float)(1.0 / 6.0), c2688 = (float)(1.0 / 2688.0), sc6 = senc * c6;
    for (int64_t j = 0; j < nj; j += VW) {
        vf b = (vf)vloadi(bits + j);
        if (profile == 0) {
            vf v = gs * (b / 6.0f);
            v = vself(v > 448.0f, vsplat(448.0f), v);
            vf s8 = e4m3v(v);
            s8 = vself(s8 == 0.0f, vsplat(0.125f), s8);
            vf m = s8 / gs; /* eff: x / eff, then * eff */
            vstore(mul + j, m);
            vstore(dq + j, m);
        } else if (profile == 3) { /* vllm: b * fp32(1/6), no zero replacement, x * r(s8 * r(gs)) */
            vf v = gs * (b * c6);
            v = vself(v > 448.0f, vsplat(448.0f), v);
            vf s8 = e4m3v(v);
            vf p = s8 * rp; /* rp = r(gs) */
            vstore(mul + j, 1.0f / (p + vself(p == 0.0f, vsplat(1e8f), vsplat(0.0f))));
            vstore(dq + j, s8 / gs);
        } else if (profile == 1) {
            vf v = (b / 6.0f) / pts;
            v = vself(v < 0.015625f, vsplat(0.015625f), vself(v > 448.0f, vsplat(448.0f), v));
            vf s8 = e4m3v(v);
            vstore(mul + j, rp / s8);
            vstore(dq + j, pts * s8);
        } else {
            vf s8 = e4m3v(b * sc6);
            vf enc = 1.0f / (s8 * sdec);
            vstore(mul + j, vself(enc > FLT_MAX, vsplat(FLT_MAX), enc));
            vstore(dq + j, (s8 * T) * c2688);
        }
    }
}

/* the tensor-level constants of nvfp4.quantize_blocks from the tensor amax T, per profile; status 1 = eager
   decides (torchao's 0/0 and overflowing reciprocals) */
typedef struct { float T, gs, pts, rp, senc, sdec; int status; } nv_consts;

static nv_consts nv_constants(float T, int profile) {
    nv_consts k = {T, 1.0f, 0.0f, 0.0f, 1.0f, 1.0f, 0};
    if (profile == 0 || profile == 3) {
        float tc = T < FLT_MIN ? FLT_MIN : T;
        k.gs = (1.0f / tc) * 2688.0f;
        if (!(fabsf(k.gs) <= FLT_MAX)) k.gs = 1.0f;
        k.rp = 1.0f / (k.gs + (k.gs == 0.0f ? 1e8f : 0.0f)); /* vllm get_reciprocal(gs) */
    } else if (profile == 1) {
        k.pts = T / 2688.0f;
        k.rp = 1.0f / k.pts;
        k.status = k.pts == 0.0f || !(k.rp <= FLT_MAX);
    } else {
        k.senc = 2688.0f / T;
        k.senc = k.senc > FLT_MAX ? FLT_MAX : k.senc;
        if (T == 0.0f || k.senc == 0.0f) k.senc = 1.0f;
        k.sdec = 1.0f / k.senc;
    }
    return k;
}

/* amax pass over one chunk: its blocks' amax bits into bj[] (kept for the quantize pass), and the running finite
   max / max over all elements (NaN / Inf bits are above every finite), reduced 8 blocks at a time */
static inline void nv_amax_chunk(const float* xr, int64_t len, int64_t block, int64_t j0, int64_t nj, uint32_t* bj,
                                 uint32_t* m, uint32_t* mall) {
    chunk_amax(xr, len, block, j0, nj, bj);
    vi fin = {0}, all = {0}, inf = (vi){0} + 0x7F800000;
    int64_t j = 0;
    for (; j + VW <= nj; j += VW) {
        vi a = vloadi(bj + j);
        all = vmax(all, a);
        fin = vmax(fin, a & (a < inf)); /* non-finite blocks: 0 here, their finite elements below */
    }
    uint32_t fm = 0, am = 0;
    for (int l = 0; l < VW; l++) {
        fm = (uint32_t)fin[l] > fm ? (uint32_t)fin[l] : fm;
        am = (uint32_t)all[l] > am ? (uint32_t)all[l] : am;
    }
    for (; j < nj; j++) {
        am = bj[j] > am ? bj[j] : am;
        fm = bj[j] < 0x7F800000u && bj[j] > fm ? bj[j] : fm;
    }
    for (j = 0; am >= 0x7F800000u && j < nj; j++) { /* a non-finite block's finite elements count for the max */
        int64_t off = (j0 + j) * block;
        uint32_t a = bj[j] >= 0x7F800000u ? finite_amax_bits(xr + off, len - off < block ? len - off : block) : 0;
        fm = a > fm ? a : fm;
    }
    *m = fm > *m ? fm : *m;
    *mall = am > *mall ? am : *mall;
}

/* full 16-blocks with RNE: the quantize pass's element loop with the division / multiplication fixed (GCC does
   not unswitch it); returns whether a block was non-finite (NaN-filled) */
static inline int nv_run16(const float* restrict xs, float* restrict ys, int64_t nj, const uint32_t* bits,
                           const float* mul, const float* dq, int div, int nt) {
    grid_k c = grid_consts(1, 0, 6.0f);
    int bad = 0;
    int64_t j = 0;
    for (; j + 2 <= nj; j += 2) { /* two blocks per trip: half the loop and NaN-check overhead */
        if ((bits[j] | bits[j + 1]) < 0x7F800000u) {
            fq_block_k(xs + 16 * j, ys + 16 * j, 16, mul[j], dq[j], div, &c, nt);
            fq_block_k(xs + 16 * j + 16, ys + 16 * j + 16, 16, mul[j + 1], dq[j + 1], div, &c, nt);
            continue;
        }
        for (int64_t i = j; i < j + 2; i++) {
            if (bits[i] >= 0x7F800000u) { bad = 1; fill_nan(ys + 16 * i, 16); }
            else fq_block_k(xs + 16 * i, ys + 16 * i, 16, mul[i], dq[i], div, &c, nt);
        }
    }
    for (; j < nj; j++) {
        if (bits[j] >= 0x7F800000u) { bad = 1; fill_nan(ys + 16 * j, 16); }
        else fq_block_k(xs + 16 * j, ys + 16 * j, 16, mul[j], dq[j], div, &c, nt);
    }
    return bad;
}

/* vllm: cast_to_fp4 returns sign(v) * |q|, so a scaled value v = x * mul of +-0 gives +0 (dq is finite, >= 0) */
static inline void nv_unsigned_zeros(const float* xr, float* yr, int64_t len, int64_t block, int64_t j0,
                                     int64_t nj, const uint32_t* bits, const float* mul) {
    for (int64_t j = 0; j < nj; j++) {
        if (bits[j] >= 0x7F800000u) continue;
        int64_t off = (j0 + j) * block, n = len - off < block ? len - off : block;
        for (int64_t k = off; k < off + n; k++)
            if (xr[k] * mul[j] == 0.0f) yr[k] = 0.0f;
    }
}

/* quantize pass over one chunk, in three steps so that the per-block scale arithmetic (divisions, the E4M3
   rounding) runs on vectors across blocks instead of as a serial chain per block; returns 1 when a non-finite block
   meets the reference policy (a static T: the eager path decides) */
static inline int nv_quantize_chunk(const float* restrict xr, float* restrict yr, int64_t len, int64_t block,
                                    int64_t j0, int64_t nj, const uint32_t* known, const nv_consts* k, int profile,
                                    int policy_block, int half_away, int nt) {
    uint32_t bits[CHUNK];
    float mul[CHUNK], dq[CHUNK];
    int eager = 0;
    if (known) memcpy(bits, known, (size_t)nj * sizeof(uint32_t));
    else chunk_amax(xr, len, block, j0, nj, bits);
    for (int64_t j = nj; j < CHUNK; j++) bits[j] = 0; /* the last vector's unused lanes */
    nv_scales(bits, nj, profile, k->T, k->gs, k->pts, k->rp, k->senc, k->sdec, mul, dq);
    if (block == 16 && !half_away && (j0 + nj) * 16 <= len) { /* the common case, specialized */
        const float* xs = xr + j0 * 16;
        float* ys = yr + j0 * 16; /* (constant div / nt per call: GCC does not unswitch the loop) */
        int bad;
        if (profile == 0)
            bad = nt ? nv_run16(xs, ys, nj, bits, mul, dq, 1, 1) : nv_run16(xs, ys, nj, bits, mul, dq, 1, 0);
        else
            bad = nt ? nv_run16(xs, ys, nj, bits, mul, dq, 0, 1) : nv_run16(xs, ys, nj, bits, mul, dq, 0, 0);
        if (profile == 3) nv_unsigned_zeros(xr, yr, len, block, j0, nj, bits, mul);
        return bad && !policy_block;
    }
    for (int64_t j = 0; j < nj; j++) {
        int64_t off = (j0 + j) * block, n = len - off < block ? len - off : block;
        if (bits[j] >= 0x7F800000u) { eager |= !policy_block; fill_nan(yr + off, n); continue; }
        if (n == 16 && !half_away) fq_block(xr + off, yr + off, 16, mul[j], dq[j], profile == 0, 1, 0, 6.0f, 0);
        else fq_block(xr + off, yr + off, n, mul[j], dq[j], profile == 0, 1, 0, 6.0f, half_away);
    }
    if (profile == 3) nv_unsigned_zeros(xr, yr, len, block, j0, nj, bits, mul);
    return eager;
}

/* NVFP4 fake quantization (profile 0 compressed_tensors, 1 torchao, 2 transformer_engine, 3 vllm; policy_block 1 = the
   block-local non-finite policy). Both passes in one parallel region (one thread wake-up per call, not two: on a
   loaded 2-core machine each wake-up of a descheduled worker can cost a scheduler time slice); one thread calls no
   OpenMP at all; nt: streaming stores (for outputs far larger than the cache) */
int quarl_nvfp4_fq(const float* x, float* y, int64_t rows, int64_t len, const nv_params* a, int nthreads, int nt) {
    int64_t block = a->block, nb = (len + block - 1) / block, nchunks = (nb + CHUNK - 1) / CHUNK;
    int profile = a->profile, pb = a->policy_block, ha = a->half_away, has_t = a->has_t;
    uint32_t local[1024], *all_bits = NULL; /* the amax pass's block amaxes: the quantize pass reads x only once more */
    if (!has_t && (all_bits = rows * nb <= 1024 ? local : malloc((size_t)(rows * nb) * sizeof(uint32_t))) == NULL)
        return 1;
    nv_consts k0 = nv_constants(a->t, profile);
    uint32_t m = 0, mall = 0;
    int eager = 0, status = has_t ? k0.status : 0;
    nt = profile == 3 ? 0 : stream_ok(y, rows, nt); /* vllm re-reads y (its zero fix): regular stores only */
#define NV_AMAX(i) { CHUNK_AT(i); nv_amax_chunk(x + ro, len, block, j0, nj, all_bits + ro / len * nb + j0, &m, &mall); }
#define NV_QUANT(i) { CHUNK_AT(i); eager |= nv_quantize_chunk(x + ro, y + ro, len, block, j0, nj, \
                          all_bits ? all_bits + ro / len * nb + j0 : NULL, &k, profile, pb, ha, nt); }
#define NV_CONSTS() { k = nv_constants(u2f(m), profile); k.status |= mall >= 0x7F800000u && !pb; }
    if (nthreads > 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            nv_consts k = k0;
            if (!has_t) {
                #pragma omp for reduction(max : m, mall) schedule(static)
                for (int64_t i = 0; i < rows * nchunks; i++) NV_AMAX(i)
                NV_CONSTS() /* (after the loop's barrier m, mall are final: every thread derives the same k) */
                #pragma omp single nowait
                status = k.status;
            }
            if (!k.status) {
                #pragma omp for reduction(| : eager) schedule(static) nowait
                for (int64_t i = 0; i < rows * nchunks; i++) NV_QUANT(i)
                if (nt) stream_fence(); /* before the region's closing barrier (which also completes the reduction) */
            }
        }
    } else {
        nv_consts k = k0;
        if (!has_t) {
            for (int64_t i = 0; i < rows * nchunks; i++) NV_AMAX(i)
            NV_CONSTS()
            status = k.status;
        }
        if (!k.status) for (int64_t i = 0; i < rows * nchunks; i++) NV_QUANT(i)
        if (nt) stream_fence();
    }
    if (all_bits != local) free(all_bits);
    return status | eager; /* 1: a non-finite tensor under the reference policy (or torchao's 0/0): eager decides */
}
"""
