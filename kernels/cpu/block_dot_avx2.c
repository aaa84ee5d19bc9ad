/* The AVX2 (+FMA, F16C) bodies of block_dot.c's kernels: chosen per call at run time
 * (`simd`), compiled for any x86-64 through target attributes, so the library also
 * loads, and runs the portable bodies, on a CPU without AVX2. Scales are read in place,
 * float32 or float16 (`half`): no widened copy of them is ever made. */
#include "block_dot.h"

#if HAVE_X86
__attribute__((target("avx2,fma")))
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight scales (or mins) from p + i as floats, p float32 or float16 (half). */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline __m256 load8(const void *p, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                : _mm256_loadu_ps((const float *)p + i);
}

/* ---- int4, x16 layout (block_dot.c) ----------------------------------------------
 * A 64-byte chunk is 4 inputs of 16 rows: two registers of 8 rows, each row's 4 codes
 * in one 32-bit lane. maddubs against 4 activation codes broadcast to every lane gives
 * each row two int16 partial sums; the eight of a block (4 chunks, low and high
 * nibbles) add up in int16 without overflow (at most 8 * 2 * 15 * 127 = 30,480), and one
 * madd by ones turns them into the row's int32 dot. Then one multiply-add by the rows'
 * scales times the step and one by their mins times step * code sum, per 8 rows. */
#define X16_MR 2

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline void x16_tile(const int mr, int64_t t, int64_t m0, const uint8_t *qs,
                            const void *scale, const void *mins, int half, int64_t G,
                            int64_t per_group, const int8_t *xq, const float *xd,
                            const int32_t *xs, int64_t nb, float *y, int64_t N) {
    __m256 acc[X16_MR][2];
    for (int j = 0; j < mr; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const uint8_t *tile = qs + t * nb * TILE_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = tile + b * TILE_BYTES;
        prefetch_ahead(p, TILE_BYTES);
        __m256i sum[X16_MR][2];
        for (int j = 0; j < mr; j++) sum[j][0] = sum[j][1] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++)
            for (int h = 0; h < 2; h++) {        /* rows 0-7, then 8-15 */
                const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * c + 32 * h));
                const __m256i lo = _mm256_and_si256(v, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                for (int j = 0; j < mr; j++) {
                    const int32_t *a = (const int32_t *)(xq + ((m0 + j) * nb + b) * QK);
                    sum[j][h] = _mm256_add_epi16(sum[j][h], _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a[c])),
                        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[4 + c]))));
                }
            }
        const int64_t at = (t * G + b / per_group) * TILE;
        for (int h = 0; h < 2; h++) {
            const __m256 s = load8(scale, at + 8 * h, half), mn = load8(mins, at + 8 * h, half);
            for (int j = 0; j < mr; j++) {
                const int64_t r = (m0 + j) * nb + b;
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[j][h], ones));
                acc[j][h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(xd[r])),
                                            acc[j][h]);
                acc[j][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xd[r] * (float)xs[r]), acc[j][h]);
            }
        }
    }
    for (int j = 0; j < mr; j++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + (m0 + j) * N + t * TILE + 8 * h, acc[j][h]);
}

__attribute__((target("avx2,fma,f16c")))
void int4_rows_avx2(INT4_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {
        int64_t m0 = 0;
        for (; m0 + X16_MR <= M; m0 += X16_MR)
            x16_tile(X16_MR, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, y, N);
        if (m0 < M)
            x16_tile(1, t, m0, qs, scale, mins, half, G, per_group, xq, xd, xs, nb, y, N);
    }
}

/* ---- int8, x16 layout ------------------------------------------------------------
 * Eight chunks of 4 inputs a block, 8 rows a register. maddubs wants one unsigned
 * operand and sums pairs in int16: |q| times the activation codes with q's sign (at most
 * 2 * 127 * 127 = 32,258, so one chunk's pair sums fit, two would not), widened to int32
 * by madd per chunk. */
__attribute__((target("avx2,fma"), always_inline))
static inline void x16_tile8(const int mr, int64_t t, int64_t m0, const int8_t *q,
                             const float *scale, int64_t G, int64_t per_group,
                             const int8_t *xq, const float *xd, int64_t nb, float *y,
                             int64_t N) {
    __m256 acc[X16_MR][2];
    for (int j = 0; j < mr; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *tile = q + t * nb * TILE8_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *p = tile + b * TILE8_BYTES;
        prefetch_ahead(p, TILE8_BYTES);
        __m256i sum[X16_MR][2];
        for (int j = 0; j < mr; j++) sum[j][0] = sum[j][1] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++)
            for (int h = 0; h < 2; h++) {        /* rows 0-7, then 8-15 */
                const __m256i w = _mm256_loadu_si256((const __m256i *)(p + 64 * c + 32 * h));
                const __m256i wabs = _mm256_sign_epi8(w, w);
                for (int j = 0; j < mr; j++) {
                    const int32_t *a = (const int32_t *)(xq + ((m0 + j) * nb + b) * QK);
                    const __m256i pairs = _mm256_maddubs_epi16(
                        wabs, _mm256_sign_epi8(_mm256_set1_epi32(a[c]), w));
                    sum[j][h] = _mm256_add_epi32(sum[j][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        const int64_t at = (t * G + b / per_group) * TILE;
        for (int h = 0; h < 2; h++) {
            const __m256 s = _mm256_loadu_ps(scale + at + 8 * h);
            for (int j = 0; j < mr; j++)
                acc[j][h] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(sum[j][h]),
                    _mm256_mul_ps(s, _mm256_set1_ps(xd[(m0 + j) * nb + b])), acc[j][h]);
        }
    }
    for (int j = 0; j < mr; j++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(y + (m0 + j) * N + t * TILE + 8 * h, acc[j][h]);
}

__attribute__((target("avx2,fma")))
void int8_rows_avx2(INT8_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    (void)xs;
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {
        int64_t m0 = 0;
        for (; m0 + X16_MR <= M; m0 += X16_MR)
            x16_tile8(X16_MR, t, m0, q, scale, G, per_group, xq, xd, nb, y, N);
        if (m0 < M)
            x16_tile8(1, t, m0, q, scale, G, per_group, xq, xd, nb, y, N);
    }
}

/* Float weights (decode_step.c's float linears): as f32_rows_c, four accumulators. */
__attribute__((target("avx2,fma")))
void f32_rows_avx2(F32_BODY_ARGS) {
    for (int64_t n = n0; n < n1; n++) {
        const float *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *a = x + m * K;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                             _mm256_setzero_ps()};
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                if (m == 0)            /* the row's first pass reads it from memory */
                    prefetch_ahead(row + k, 32 * sizeof(float));
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8 * u),
                                             _mm256_loadu_ps(a + k + 8 * u), acc[u]);
            }
            float tail = 0.0f;
            for (; k < K; k++) tail += row[k] * a[k];
            y[m * N + n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                               _mm256_add_ps(acc[2], acc[3]))) + tail;
        }
    }
}
#endif
