/* The AVX-512 bodies of block_dot.c's kernels (F, BW, VL, DQ and VNNI: Ice Lake,
 * Sapphire Rapids, Zen 4 and later): chosen per call at run time (`simd` = BODY_AVX512),
 * compiled for any x86-64 through target attributes like the AVX2 ones.
 *
 * What the wider unit buys: one register holds two blocks of 32 codes, and VNNI's
 * vpdpbusd does the u8 x s8 multiply and the sum of four into int32 in one
 * instruction where AVX2 needs two (maddubs, madd) on half the width, so a block costs
 * about a quarter of the instructions. Lanes 0-7 of each int32 result belong to the
 * first block of the pair and lanes 8-15 to the second; a "pair" vector holds the two
 * blocks' float scales in those halves. An odd last block goes through the 256-bit form
 * of the same instructions (VL), zero-extended into the accumulators. */
#include "block_dot.h"

#if HAVE_X86
#define AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"
#define ALWAYS __attribute__((target(AVX512), always_inline)) static inline

/* [lo x 8, hi x 8]: the scales of a pair of blocks, lanes as the int32 dots have them. */
ALWAYS __m512 pair_of(float lo, float hi) {
    return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(lo), _mm512_set1_ps(hi));
}

/* Sixteen scales (or mins) from p + i as floats, p float32 or float16 (half). */
ALWAYS __m512 load16(const void *p, int64_t i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}

ALWAYS float load1(const void *p, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Two blocks' 64 weight codes from their 32 packed bytes P (16 per block): 128-bit lanes
 * [P0 & 15, P0 >> 4, P1 & 15, P1 >> 4], inputs 0-31 of each block in order. */
ALWAYS __m512i unpack_pair(const uint8_t *p) {
    const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p));
    const __m512i dup = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), x);
    const __m512i hi = _mm512_mask_srli_epi16(dup, 0xFF00FF00u, dup, 4);   /* lanes 1, 3 */
    return _mm512_and_si512(hi, _mm512_set1_epi8(15));
}

/* One block's 32 codes, as the AVX2 body unpacks them. */
ALWAYS __m256i unpack_one(const uint8_t *p) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed),
                            _mm256_set1_epi8(15));
}

/* u8 x s8 dots, four lanes into each int32, as floats. */
ALWAYS __m512 dot_pair(__m512i w, __m512i a) {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a));
}

ALWAYS __m512 dot_one(__m256i w, __m256i a) {
    return _mm512_zextps256_ps512(
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)));
}

/* s8 x s8 through the u8 x s8 instruction: |w| (-128 reads as 128) times a with w's sign. */
ALWAYS __m512 dot_pair_s8(__m512i w, __m512i a) {
    const __m512i signed_a = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w),
                                                  _mm512_setzero_si512(), a);
    return dot_pair(_mm512_abs_epi8(w), signed_a);
}

ALWAYS __m512 dot_one_s8(__m256i w, __m256i a) {
    return dot_one(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

/* The min term of one weight row against one activation row: sum over blocks of
 * min * step * code sum (xd, xs: that row's steps and sums). */
ALWAYS float min_term(const void *mins, int64_t at, int half, int64_t per_group,
                      const float *xd, const int32_t *xs, int64_t nb) {
    __m512 v = _mm512_setzero_ps();
    float tail = 0.0f;
    int64_t b = 0;
    if (per_group == 1)
        for (; b + 16 <= nb; b += 16)
            v = _mm512_fmadd_ps(load16(mins, at + b, half),
                                _mm512_mul_ps(_mm512_loadu_ps(xd + b),
                                              _mm512_cvtepi32_ps(_mm512_loadu_si512(xs + b))),
                                v);
    for (; b < nb; b++) tail += load1(mins, at + b / per_group, half) * xd[b] * (float)xs[b];
    return _mm512_reduce_add_ps(v) + tail;
}

/* comb[b] = scale of block b (of the row whose scales start at `at`) * step[b]. */
ALWAYS void combine(float *comb, const void *scale, int64_t at, int half, int64_t per_group,
                    const float *xd, int64_t nb) {
    int64_t b = 0;
    if (per_group == 1)
        for (; b + 16 <= nb; b += 16)
            _mm512_storeu_ps(comb + b, _mm512_mul_ps(load16(scale, at + b, half),
                                                     _mm512_loadu_ps(xd + b)));
    for (; b < nb; b++) comb[b] = load1(scale, at + b / per_group, half) * xd[b];
}

/* ---- batch 1: one weight row at a time, one stream (see block_dot_avx2.c) ---------- */

/* The dot of a pair of blocks (one block: the 256-bit form) of either kind of weight
 * at p against activation codes a; `bits` is a constant at every call. */
ALWAYS __m512 weight_pair_dot(const int bits, const uint8_t *p, const int8_t *a) {
    const __m512i av = _mm512_loadu_si512(a);
    return bits == 4 ? dot_pair(unpack_pair(p), av) : dot_pair_s8(_mm512_loadu_si512(p), av);
}

ALWAYS __m512 weight_one_dot(const int bits, const uint8_t *p, const int8_t *a) {
    const __m256i av = _mm256_loadu_si256((const __m256i *)a);
    return bits == 4 ? dot_one(unpack_one(p), av)
                     : dot_one_s8(_mm256_loadu_si256((const __m256i *)p), av);
}

ALWAYS void block_row1(const int bits, int64_t n0, int64_t n1, const void *w,
                       const void *scale, const void *mins, int half, int64_t G,
                       int64_t per_group, const int8_t *xq, const float *xd,
                       const int32_t *xs, int64_t nb, float *y) {
    const int64_t block_bytes = QK * bits / 8;
    float comb[ROW1_MAX_BLOCKS];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = (const uint8_t *)w + n * nb * block_bytes;
        combine(comb, scale, n * G, half, per_group, xd, nb);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) {
            for (int64_t l = 0; l < 8 * block_bytes; l += 64)
                _mm_prefetch((const char *)row + b * block_bytes + PREFETCH_BYTES + l,
                             _MM_HINT_T0);
            for (int u = 0; u < 4; u++) {
                const int64_t c = b + 2 * u;
                acc[u] = _mm512_fmadd_ps(pair_of(comb[c], comb[c + 1]),
                                         weight_pair_dot(bits, row + c * block_bytes, xq + c * QK),
                                         acc[u]);
            }
        }
        for (; b + 2 <= nb; b += 2)
            acc[0] = _mm512_fmadd_ps(pair_of(comb[b], comb[b + 1]),
                                     weight_pair_dot(bits, row + b * block_bytes, xq + b * QK),
                                     acc[0]);
        if (b < nb)
            acc[1] = _mm512_fmadd_ps(_mm512_set1_ps(comb[b]),
                                     weight_one_dot(bits, row + b * block_bytes, xq + b * QK),
                                     acc[1]);
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                  _mm512_add_ps(acc[2], acc[3])))
               + (bits == 4 ? min_term(mins, n * G, half, per_group, xd, xs, nb) : 0.0f);
    }
}

/* ---- batches: tiles of NR weight rows by up to MR activation rows ------------------
 * Each weight pair is unpacked once for the tile's MR activation rows and each
 * activation pair loaded once for its NR weight rows; the 16 accumulators and the
 * operands fit the 32 registers. The scale of (row, block) times the step of
 * (activation row, block) is one multiply per pair and tile cell. */
#define NR 4
#define MR 4

/* Activation rows m0 .. m0+mr-1 at blocks b, b+1 (only b where `one`): codes and steps. */
ALWAYS void activation_pairs(__m512i *a, __m512 *d, int64_t m0, const int mr, int64_t b,
                             int one, const int8_t *xq, const float *xd, int64_t nb) {
    for (int j = 0; j < mr; j++) {
        const int64_t r = (m0 + j) * nb + b;
        a[j] = one ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(xq + r * QK)))
                   : _mm512_loadu_si512(xq + r * QK);
        d[j] = pair_of(xd[r], one ? 0.0f : xd[r + 1]);
    }
}

/* One tile of either kind: `bits` (4: unsigned nibbles with mins, 8: signed bytes) is a
 * constant at every call, so each kind compiles to its own loop. */
ALWAYS void block_tile(const int bits, int64_t n, int64_t m0, const int mr, const void *w,
                       const void *scale, const void *mins, int half, int64_t G,
                       int64_t per_group, const int8_t *xq, const float *xd,
                       const int32_t *xs, int64_t nb, float *y, int64_t N) {
    __m512 acc[NR][MR];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t row_bytes = nb * QK * bits / 8, block_bytes = QK * bits / 8;
    for (int64_t b = 0; b < nb; b += 2) {
        const int one = b + 1 == nb;           /* an odd last block: the 256-bit forms */
        __m512i a[MR];
        __m512 d[MR];
        activation_pairs(a, d, m0, mr, b, one, xq, xd, nb);
        for (int i = 0; i < NR; i++) {
            const uint8_t *p = (const uint8_t *)w + (n + i) * row_bytes + b * block_bytes;
            _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T0);
            if (bits == 8) _mm_prefetch((const char *)p + PREFETCH_BYTES + 32, _MM_HINT_T0);
            const int64_t at = (n + i) * G;
            const __m512 s = pair_of(load1(scale, at + b / per_group, half),
                                     one ? 0.0f : load1(scale, at + (b + 1) / per_group, half));
            if (one) {
                const __m256i wv = bits == 4 ? unpack_one(p)
                                             : _mm256_loadu_si256((const __m256i *)p);
                for (int j = 0; j < mr; j++) {
                    const __m256i aj = _mm512_castsi512_si256(a[j]);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(s, d[j]),
                                                bits == 4 ? dot_one(wv, aj) : dot_one_s8(wv, aj),
                                                acc[i][j]);
                }
            } else {
                const __m512i wv = bits == 4 ? unpack_pair(p) : _mm512_loadu_si512(p);
                for (int j = 0; j < mr; j++)
                    acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(s, d[j]),
                                                bits == 4 ? dot_pair(wv, a[j])
                                                          : dot_pair_s8(wv, a[j]),
                                                acc[i][j]);
            }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++) {
            const int64_t m = m0 + j;
            y[m * N + n + i] = _mm512_reduce_add_ps(acc[i][j]) + (bits == 4
                ? min_term(mins, (n + i) * G, half, per_group, xd + m * nb, xs + m * nb, nb)
                : 0.0f);
        }
}

ALWAYS void int8_tile(int64_t n, int64_t m0, const int mr, const int8_t *q,
                      const float *scale, int64_t G, int64_t per_group, const int8_t *xq,
                      const float *xd, int64_t nb, float *y, int64_t N) {
    block_tile(8, n, m0, mr, q, scale, NULL, 0, G, per_group, xq, xd, NULL, nb, y, N);
}

/* Runs tile(n, m0, mr, ...) over rows [n0, n1) in NR steps, mr a constant per call so
 * the accumulators stay in registers; the last NR - 1 rows at most go to `rest`. */
#define OVER_TILES(tile, rest, ...) do {                                              \
    int64_t n = n0;                                                                   \
    for (; n + NR <= n1; n += NR) {                                                   \
        int64_t m0 = 0;                                                               \
        for (; m0 + MR <= M; m0 += MR) tile(n, m0, MR, __VA_ARGS__);                  \
        switch (M - m0) {                                                             \
        case 3: tile(n, m0, 3, __VA_ARGS__); break;                                   \
        case 2: tile(n, m0, 2, __VA_ARGS__); break;                                   \
        case 1: tile(n, m0, 1, __VA_ARGS__); break;                                   \
        default: break;                                                               \
        }                                                                             \
    }                                                                                 \
    if (n < n1) rest;                                                                 \
} while (0)

/* ---- int4, x16 layout (block_dot.c): 16 output rows in the lanes ------------------
 * Per tile block: four 64-byte loads give 4 inputs of 16 rows each, low and high
 * nibbles; per activation row, eight vpdpbusd against 4 codes broadcast from memory
 * make the 16 rows' int32 dots, then one multiply-add by the rows' scales times the
 * activation's step and one by the rows' mins times step * code sum. The weights are
 * unpacked once for up to X16_MR activation rows; two dot chains per row (low, high)
 * hide vpdpbusd's latency at batch 1. */
#define X16_MR 4

ALWAYS void x16_tile(const int mr, int64_t t, int64_t m0, const uint8_t *qs,
                     const void *scale, const void *mins, int half, int64_t G,
                     int64_t per_group, const int8_t *xq, const float *xd, const int32_t *xs,
                     int64_t nb, int64_t K, float *y, int64_t N) {
    __m512 acc[X16_MR];
    for (int j = 0; j < mr; j++) acc[j] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(15);
    const uint8_t *tile = qs + t * nb * TILE_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * TILE_BYTES;
        for (int l = 0; l < TILE_BYTES; l += 64)
            _mm_prefetch((const char *)p + PREFETCH_BYTES + l, _MM_HINT_T0);
        __m512i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m512i v = _mm512_loadu_si512(p + 64 * c);
            lo[c] = _mm512_and_si512(v, low4);
            hi[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        const int64_t at = (t * G + b / per_group) * TILE;
        const __m512 s = load16(scale, at, half), mn = load16(mins, at, half);
        for (int j = 0; j < mr; j++) {
            const int64_t r = (m0 + j) * nb + b;
            const int32_t *a = (const int32_t *)(xq + r * QK);   /* 4 codes per int32 */
            __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
            for (int c = 0; c < 4; c++) {
                d0 = _mm512_dpbusd_epi32(d0, lo[c], _mm512_set1_epi32(a[c]));
                d1 = _mm512_dpbusd_epi32(d1, hi[c], _mm512_set1_epi32(a[4 + c]));
            }
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                                     _mm512_mul_ps(s, _mm512_set1_ps(xd[r])), acc[j]);
            acc[j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xd[r] * (float)xs[r]), acc[j]);
        }
    }
    for (int j = 0; j < mr; j++) _mm512_storeu_ps(y + (m0 + j) * N + t * TILE, acc[j]);
}

__attribute__((target(AVX512)))
void int4_rows_avx512(INT4_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {
        int64_t m0 = 0;
        for (; m0 + X16_MR <= M; m0 += X16_MR)
            x16_tile(X16_MR, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, K, y, N);
        switch (M - m0) {
        case 3: x16_tile(3, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, K, y, N); break;
        case 2: x16_tile(2, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, K, y, N); break;
        case 1: x16_tile(1, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, K, y, N); break;
        default: break;
        }
    }
}

__attribute__((target(AVX512)))
void int8_rows_avx512(INT8_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    if (M == 1 && nb <= ROW1_MAX_BLOCKS) {
        block_row1(8, n0, n1, q, scale, NULL, 0, G, per_group, xq, xd, NULL, nb, y);
        return;
    }
    OVER_TILES(int8_tile, int8_rows_c(n, n1, q, scale, group, xq, xd, M, K, y, N),
               q, scale, G, per_group, xq, xd, nb, y, N);
}

/* One row of an int4 weight dequantized to bfloat16 (a bf16 prefill's weights): per
 * block, the 32 codes widened to floats, q * scale then + min (two roundings, as the
 * portable body and torch compute it), and the hardware's round-to-nearest-even
 * conversion of both halves at once. About ten instructions a block, where the
 * compiler's vectorization of the portable loops took several times that. */
__attribute__((target(AVX512 ",avx512bf16")))
void int4_row_to_bf16_avx512(const uint8_t *row, const void *scale, const void *mins,
                             int half, int64_t at, int64_t per_group, int64_t nb,
                             uint16_t *out) {
    const __m128i low4 = _mm_set1_epi8(15);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = at + b / per_group;
        const __m512 s = _mm512_set1_ps(load1(scale, g, half)), m = _mm512_set1_ps(load1(mins, g, half));
        const __m128i p = _mm_loadu_si128((const __m128i *)(row + b * (QK / 2)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(p, low4)));
        const __m512 hi = _mm512_cvtepi32_ps(
            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(p, 4), low4)));
        const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_add_ps(_mm512_mul_ps(hi, s), m),
                                               _mm512_add_ps(_mm512_mul_ps(lo, s), m));
        _mm512_storeu_si512(out + b * QK, (__m512i)v);
    }
}

/* Float weights (decode_step.c's float linears): as f32_rows_c, four accumulators. */
__attribute__((target(AVX512)))
void f32_rows_avx512(F32_BODY_ARGS) {
    for (int64_t n = n0; n < n1; n++) {
        const float *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *a = x + m * K;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            int64_t k = 0;
            for (; k + 64 <= K; k += 64) {
                if (m == 0)            /* the row's first pass reads it from memory */
                    for (int l = 0; l < 64 * 4; l += 64)
                        _mm_prefetch((const char *)(row + k) + PREFETCH_BYTES + l, _MM_HINT_T0);
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(row + k + 16 * u),
                                             _mm512_loadu_ps(a + k + 16 * u), acc[u]);
            }
            for (; k + 16 <= K; k += 16)
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(row + k), _mm512_loadu_ps(a + k), acc[0]);
            float tail = 0.0f;
            for (; k < K; k++) tail += row[k] * a[k];
            y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                              _mm512_add_ps(acc[2], acc[3])))
                           + tail;
        }
    }
}
#endif
