/* The AVX-512 bodies of block_dot.c's kernels (F, BW, VL, DQ and VNNI: Ice Lake,
 * Sapphire Rapids, Zen 4 and later): chosen per call at run time (`simd` = BODY_AVX512),
 * compiled for any x86-64 through target attributes like the AVX2 ones.
 *
 * What the wider unit buys: one register is 4 inputs of a whole x16 tile (16 rows), and
 * VNNI's vpdpbusd does the u8 x s8 multiply and the sum of four into int32 in one
 * instruction where AVX2 needs two (maddubs, madd) on half the width. */
#include "block_dot.h"

#if HAVE_X86
#define AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"
#define ALWAYS __attribute__((target(AVX512), always_inline)) static inline

/* Sixteen scales (or mins) from p + i as floats, p float32 or float16 (half). */
ALWAYS __m512 load16(const void *p, int64_t i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)))
                : _mm512_loadu_ps((const float *)p + i);
}

ALWAYS float load1(const void *p, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

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
        prefetch_ahead(p, TILE_BYTES);
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

/* Runs tile(mr, t, m0, ...) over the tiles of rows [n0, n1) and the activation rows in
 * steps of X16_MR, mr a constant at every call so the accumulators stay in registers. */
#define OVER_TILES(tile, ...) do {                                                     \
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {                                  \
        int64_t m0 = 0;                                                                \
        for (; m0 + X16_MR <= M; m0 += X16_MR) tile(X16_MR, t, m0, __VA_ARGS__);       \
        switch (M - m0) {                                                              \
        case 3: tile(3, t, m0, __VA_ARGS__); break;                                    \
        case 2: tile(2, t, m0, __VA_ARGS__); break;                                    \
        case 1: tile(1, t, m0, __VA_ARGS__); break;                                    \
        default: break;                                                                \
        }                                                                              \
    }                                                                                  \
} while (0)

__attribute__((target(AVX512)))
void int4_rows_avx512(INT4_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    OVER_TILES(x16_tile, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, K, y, N);
}

/* ---- int8, x16 layout ---------------------------------------------------------------
 * As int4's, with eight chunks of 4 inputs a block and no unpacking: vpdpbusd wants one
 * unsigned operand, so the weight bytes are flipped to q + 128 (one xor per chunk,
 * shared by the activation rows) and 128 times the block's activation code sum (xs) is
 * taken off the dot, which starts there. */
ALWAYS void x16_tile8(const int mr, int64_t t, int64_t m0, const int8_t *q,
                      const float *scale, int64_t G, int64_t per_group, const int8_t *xq,
                      const float *xd, const int32_t *xs, int64_t nb, float *y, int64_t N) {
    __m512 acc[X16_MR];
    for (int j = 0; j < mr; j++) acc[j] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *tile = q + t * nb * TILE8_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *p = tile + b * TILE8_BYTES;
        prefetch_ahead(p, TILE8_BYTES);
        __m512i u[8];
        for (int c = 0; c < 8; c++) u[c] = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * c), flip);
        const __m512 s = _mm512_loadu_ps(scale + (t * G + b / per_group) * TILE);
        for (int j = 0; j < mr; j++) {
            const int64_t r = (m0 + j) * nb + b;
            const int32_t *a = (const int32_t *)(xq + r * QK);
            __m512i d0 = _mm512_set1_epi32(-128 * xs[r]), d1 = _mm512_setzero_si512();
            for (int c = 0; c < 8; c += 2) {
                d0 = _mm512_dpbusd_epi32(d0, u[c], _mm512_set1_epi32(a[c]));
                d1 = _mm512_dpbusd_epi32(d1, u[c + 1], _mm512_set1_epi32(a[c + 1]));
            }
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)),
                                     _mm512_mul_ps(s, _mm512_set1_ps(xd[r])), acc[j]);
        }
    }
    for (int j = 0; j < mr; j++) _mm512_storeu_ps(y + (m0 + j) * N + t * TILE, acc[j]);
}

__attribute__((target(AVX512)))
void int8_rows_avx512(INT8_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    OVER_TILES(x16_tile8, q, scale, G, per_group, xq, xd, xs, nb, y, N);
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
                    prefetch_ahead(row + k, 64 * sizeof(float));
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
