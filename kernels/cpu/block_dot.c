/* Matrix products of float activations with int4 / int8 weights held in blocks of 32,
 * for CPU decode: the activations are quantized to int8 per block of 32 (as llama.cpp
 * does for its Q4/Q8 dot products), so the inner loop is an integer dot product of 32
 * lanes and each weight byte is read once per call whatever the number of rows M.
 *
 * Weights (N output rows, K inputs, K a multiple of 32, G = K / group groups):
 *   int4: qs (N, K/2) uint8, byte j of block b holding inputs 32b+j (low nibble) and
 *         32b+j+16 (high nibble), as GGUF's Q4_0/Q4_1 do; scale and min (N, G) float,
 *         or float16 (`half`: a GGUF's own, 2 bytes each instead of 4, which at batch 1
 *         is an eighth of what a step reads), W[n,k] = q * scale[n,g] + min[n,g].
 *   int8: q (N, K) int8 in [-127, 127]; scale (N, G) float, W[n,k] = q * scale[n,g].
 * Activations: x (M, K) float; quantize_rows writes xq (M, K) int8, xd (M, K/32) float
 * (the step of each block) and xs (M, K/32) int32 (each block's sum of codes, for min).
 * Output: y (M, N) float, overwritten.
 *
 * Every kernel has two bodies: AVX2 (+FMA, F16C-free) and portable C. The caller picks
 * one per call (`simd`), from the CPU's capability at run time, so both are tested on
 * any x86 machine. Rows of the output are split across OpenMP threads; `threads` is the
 * caller's torch thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define QK 32

/* IEEE half -> float, exactly (normals, subnormals, inf, nan). */
static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    uint32_t bits;
    if (e == 31)
        bits = sign | 0x7f800000u | (m << 13);
    else if (e)
        bits = sign | ((e + 112) << 23) | (m << 13);
    else if (!m)
        bits = sign;
    else {                                     /* subnormal: normalize */
        int shift = 0;
        uint32_t mm = m;
        while (!(mm & 1024)) { mm <<= 1; shift++; }
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mm & 1023) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

int block_dot_has_avx2(void) {
#if HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* ---- activations --------------------------------------------------------------- */

void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd,
                   int32_t *xs) {
    const int64_t nb = K / QK;
    for (int64_t r = 0; r < M * nb; r++) {
        const float *v = x + r * QK;
        float amax = 0.0f;
#pragma omp simd reduction(max:amax)
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            const int32_t q = (int32_t)lrintf(v[j] * inv);
            xq[r * QK + j] = (int8_t)q;
            sum += q;
        }
        xd[r] = d;
        xs[r] = sum;
    }
}

/* ---- portable bodies ----------------------------------------------------------- */

static void int4_rows_c(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
                        const float *mins, int64_t G, int64_t group, const int8_t *xq,
                        const float *xd, const int32_t *xs, int64_t M, int64_t K,
                        float *y, int64_t N) {
    const int64_t nb = K / QK, per_group = group / QK;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wrow = qs + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *w = wrow + b * (QK / 2);
                const int8_t *a = xq + m * K + b * QK;
                int32_t dot = 0;
                for (int j = 0; j < QK / 2; j++)
                    dot += (w[j] & 15) * a[j] + (w[j] >> 4) * a[j + QK / 2];
                const int64_t g = n * G + b / per_group;
                acc += scale[g] * xd[m * nb + b] * (float)dot
                     + mins[g] * xd[m * nb + b] * (float)xs[m * nb + b];
            }
            y[m * N + n] = acc;
        }
    }
}

static void int8_rows_c(int64_t n0, int64_t n1, const int8_t *q, const float *scale,
                        int64_t G, int64_t group, const int8_t *xq, const float *xd,
                        int64_t M, int64_t K, float *y, int64_t N) {
    const int64_t nb = K / QK, per_group = group / QK;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *w = q + n * K + b * QK;
                const int8_t *a = xq + m * K + b * QK;
                int32_t dot = 0;
                for (int j = 0; j < QK; j++) dot += w[j] * a[j];
                acc += scale[n * G + b / per_group] * xd[m * nb + b] * (float)dot;
            }
            y[m * N + n] = acc;
        }
    }
}

/* ---- AVX2 bodies --------------------------------------------------------------- */

#if HAVE_X86
__attribute__((target("avx2,fma")))
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 unsigned weight codes (u8) times 32 signed activation codes -> 8 int32 as floats. */
__attribute__((target("avx2,fma")))
static inline __m256 dot_u8s8(__m256i w, __m256i a) {
    const __m256i pairs = _mm256_maddubs_epi16(w, a);        /* 16 x int16, no overflow: 15*127*2 or 127*127*2 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

/* Four weight rows by two activation rows at a time: eight independent accumulator
 * chains hide the latency of the multiply-adds (8 of the 16 ymm registers), each
 * weight block is unpacked once for two activation rows and each activation block
 * loaded once for four weight rows. The four weight rows (4 x K/2 bytes) stay in L1
 * while the M activation rows pass over them. */
#define NR 4
#define MR 2   /* activation rows per pass over the four weight rows */

__attribute__((target("avx2,fma")))
static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)p);
    /* inputs 0..15 from the low nibbles, 16..31 from the high ones */
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(15));
}

/* One tile: weight rows n..n+NR-1 against activation rows m0..m0+mr-1. Always inlined
 * with a constant `mr`, so the accumulators live in registers. */
__attribute__((target("avx2,fma"), always_inline))
static inline void int4_tile(int64_t n, int64_t m0, const int mr, const uint8_t *qs,
                             const float *scale, const float *mins, int64_t G,
                             int64_t per_group, const int8_t *xq, const float *xd,
                             const int32_t *xs, int64_t nb, int64_t row_bytes, float *y,
                             int64_t N) {
    __m256 acc[NR][MR];
    float mins_acc[NR][MR];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++) { acc[i][j] = _mm256_setzero_ps(); mins_acc[i][j] = 0.0f; }
    for (int64_t b = 0; b < nb; b++) {
        __m256i a[MR];
        float d[MR], sd[MR];
        for (int j = 0; j < mr; j++) {
            const int64_t r = (m0 + j) * nb + b;
            a[j] = _mm256_loadu_si256((const __m256i *)(xq + r * QK));
            d[j] = xd[r];
            sd[j] = xd[r] * (float)xs[r];
        }
        for (int i = 0; i < NR; i++) {
            const __m256i w = unpack_nibbles(qs + (n + i) * row_bytes + b * (QK / 2));
            const int64_t g = (n + i) * G + b / per_group;
            for (int j = 0; j < mr; j++) {
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * d[j]),
                                            dot_u8s8(w, a[j]), acc[i][j]);
                mins_acc[i][j] += mins[g] * sd[j];
            }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++)
            y[(m0 + j) * N + n + i] = hsum8(acc[i][j]) + mins_acc[i][j];
}

/* One activation row (batch-1 decode): one weight row at a time, so the whole matrix
 * is read front to back as one stream. Four tiles of rows read four streams at the
 * row stride, which the hardware prefetcher follows poorly once a row is longer than
 * a few cache lines (measured at K = 1536: half the bandwidth of K = 576). Four
 * accumulators over consecutive blocks hide the multiply-add latency instead. */
__attribute__((target("avx2,fma")))
static void int4_row1_avx2(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
                           const float *mins, int64_t G, int64_t per_group,
                           const int8_t *xq, const float *xd, const int32_t *xs, int64_t nb,
                           float *y) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = qs + n * nb * (QK / 2);
        const float *sc = scale + n * G, *mn = mins + n * G;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        float min_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};     /* four chains here too */
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4)
            for (int u = 0; u < 4; u++) {
                const int64_t g = (b + u) / per_group;
                const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (b + u) * QK));
                acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g] * xd[b + u]),
                                         dot_u8s8(unpack_nibbles(row + (b + u) * (QK / 2)), a),
                                         acc[u]);
                min_acc[u] += mn[g] * xd[b + u] * (float)xs[b + u];
            }
        for (; b < nb; b++) {
            const int64_t g = b / per_group;
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g] * xd[b]),
                                     dot_u8s8(unpack_nibbles(row + b * (QK / 2)), a), acc[0]);
            min_acc[0] += mn[g] * xd[b] * (float)xs[b];
        }
        y[n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                   _mm256_add_ps(acc[2], acc[3])))
               + (min_acc[0] + min_acc[1]) + (min_acc[2] + min_acc[3]);
    }
}

/* int4_row1_avx2 for groups of one block (every GGUF): the per-block scalar work, the
 * scale times the activation step and the min term, is done eight blocks at a time
 * per row (the min term is then one dot product of mins with step * code sum), so the
 * inner loop is the unpack, the integer dot and one multiply-add by a loaded
 * broadcast. At batch 1 the kernel is bound by instructions, not memory, on this CPU
 * (its two vCPUs are one core's hyperthreads). */
#define ROW1_MAX_BLOCKS 512

/* Eight scales (or mins) from p + i as floats, p float32 or float16 (half). */
__attribute__((target("avx2,fma,f16c"), always_inline))
static inline __m256 load8(const void *p, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                : _mm256_loadu_ps((const float *)p + i);
}

__attribute__((target("avx2,fma,f16c"), always_inline))
static inline float load1(const void *p, int64_t i, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Scales and mins are read in place, float16 or float32: no widened copy. */
__attribute__((target("avx2,fma,f16c")))
static void int4_row1_g32_avx2(int64_t n0, int64_t n1, const uint8_t *qs, const void *scale,
                               const void *mins, int half, const int8_t *xq, const float *xd,
                               const int32_t *xs, int64_t nb, float *y) {
    float xds[ROW1_MAX_BLOCKS], comb[ROW1_MAX_BLOCKS];
    for (int64_t b = 0; b < nb; b++) xds[b] = xd[b] * (float)xs[b];
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = qs + n * nb * (QK / 2);
        const int64_t at = n * nb;                   /* this row's first scale */
        __m256 mv = _mm256_setzero_ps();
        float mtail = 0.0f;
        int64_t b = 0;
        for (; b + 8 <= nb; b += 8) {
            _mm256_storeu_ps(comb + b, _mm256_mul_ps(load8(scale, at + b, half),
                                                     _mm256_loadu_ps(xd + b)));
            mv = _mm256_fmadd_ps(load8(mins, at + b, half), _mm256_loadu_ps(xds + b), mv);
        }
        for (; b < nb; b++) {
            comb[b] = load1(scale, at + b, half) * xd[b];
            mtail += load1(mins, at + b, half) * xds[b];
        }
        __m256 acc[4] = {mv, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (b = 0; b + 4 <= nb; b += 4)
            for (int u = 0; u < 4; u++) {
                const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + (b + u) * QK));
                acc[u] = _mm256_fmadd_ps(_mm256_broadcast_ss(comb + b + u),
                                         dot_u8s8(unpack_nibbles(row + (b + u) * (QK / 2)), a),
                                         acc[u]);
            }
        for (; b < nb; b++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(comb + b),
                                     dot_u8s8(unpack_nibbles(row + b * (QK / 2)), a), acc[0]);
        }
        y[n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                   _mm256_add_ps(acc[2], acc[3]))) + mtail;
    }
}

__attribute__((target("avx2,fma")))
static void int4_rows_avx2(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
                           const float *mins, int64_t G, int64_t group, const int8_t *xq,
                           const float *xd, const int32_t *xs, int64_t M, int64_t K,
                           float *y, int64_t N) {
    const int64_t nb = K / QK, per_group = group / QK, row_bytes = K / 2;
    if (M == 1 && per_group == 1 && nb <= ROW1_MAX_BLOCKS) {
        int4_row1_g32_avx2(n0, n1, qs, scale, mins, 0, xq, xd, xs, nb, y);
        return;
    }
    if (M == 1) {
        int4_row1_avx2(n0, n1, qs, scale, mins, G, per_group, xq, xd, xs, nb, y);
        return;
    }
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
        int64_t m0 = 0;
        for (; m0 + MR <= M; m0 += MR)
            int4_tile(n, m0, MR, qs, scale, mins, G, per_group, xq, xd, xs, nb, row_bytes, y, N);
        if (m0 < M)
            int4_tile(n, m0, 1, qs, scale, mins, G, per_group, xq, xd, xs, nb, row_bytes, y, N);
    }
    if (n < n1)
        int4_rows_c(n, n1, qs, scale, mins, G, group, xq, xd, xs, M, K, y, N);
}

__attribute__((target("avx2,fma"), always_inline))
static inline void int8_tile(int64_t n, int64_t m0, const int mr, const int8_t *q,
                             const float *scale, int64_t G, int64_t per_group,
                             const int8_t *xq, const float *xd, int64_t nb, int64_t K,
                             float *y, int64_t N) {
    __m256 acc[NR][MR];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i a[MR];
        float d[MR];
        for (int j = 0; j < mr; j++) {
            const int64_t r = (m0 + j) * nb + b;
            a[j] = _mm256_loadu_si256((const __m256i *)(xq + r * QK));
            d[j] = xd[r];
        }
        for (int i = 0; i < NR; i++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q + (n + i) * K + b * QK));
            /* s8 x s8 through the u8 x s8 instruction: |w| times a with w's sign */
            const __m256i wabs = _mm256_sign_epi8(w, w);
            const float ws = scale[(n + i) * G + b / per_group];
            for (int j = 0; j < mr; j++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(ws * d[j]),
                                            dot_u8s8(wabs, _mm256_sign_epi8(a[j], w)), acc[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < mr; j++) y[(m0 + j) * N + n + i] = hsum8(acc[i][j]);
}

/* One activation row of int8 (the output head at batch 1): a row at a time, its scales
 * times the activation steps first, as int4_row1_g32_avx2 does. */
__attribute__((target("avx2,fma")))
static void int8_row1_avx2(int64_t n0, int64_t n1, const int8_t *q, const float *scale,
                           int64_t G, int64_t per_group, const int8_t *xq, const float *xd,
                           int64_t nb, float *y) {
    float comb[ROW1_MAX_BLOCKS];
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *row = q + n * nb * QK;
        const float *sc = scale + n * G;
        int64_t b = 0;
        if (per_group == 1)
            for (; b + 8 <= nb; b += 8)
                _mm256_storeu_ps(comb + b, _mm256_mul_ps(_mm256_loadu_ps(sc + b),
                                                         _mm256_loadu_ps(xd + b)));
        for (; b < nb; b++) comb[b] = sc[b / per_group] * xd[b];
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        for (b = 0; b < nb; b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + b * QK));
            const __m256i a = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
            /* s8 x s8 through the u8 x s8 instruction: |w| times a with w's sign */
            acc[b & 3] = _mm256_fmadd_ps(_mm256_broadcast_ss(comb + b),
                                         dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)),
                                         acc[b & 3]);
        }
        y[n] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                   _mm256_add_ps(acc[2], acc[3])));
    }
}

__attribute__((target("avx2,fma")))
static void int8_rows_avx2(int64_t n0, int64_t n1, const int8_t *q, const float *scale,
                           int64_t G, int64_t group, const int8_t *xq, const float *xd,
                           int64_t M, int64_t K, float *y, int64_t N) {
    const int64_t nb = K / QK, per_group = group / QK;
    if (M == 1 && nb <= ROW1_MAX_BLOCKS) {
        int8_row1_avx2(n0, n1, q, scale, G, per_group, xq, xd, nb, y);
        return;
    }
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) {
        int64_t m0 = 0;
        for (; m0 + MR <= M; m0 += MR)
            int8_tile(n, m0, MR, q, scale, G, per_group, xq, xd, nb, K, y, N);
        if (m0 < M)
            int8_tile(n, m0, 1, q, scale, G, per_group, xq, xd, nb, K, y, N);
    }
    if (n < n1)
        int8_rows_c(n, n1, q, scale, G, group, xq, xd, M, K, y, N);
}
#endif

/* ---- entry points: split the output rows across threads ------------------------ */

/* Rows per task: a multiple of 8 (a cache line of float outputs) so threads never
 * write the same line. */
static int64_t chunk_rows(int64_t N, int threads) {
    int64_t c = (N + threads - 1) / threads;
    return (c + 7) / 8 * 8;
}

/* One body per call: AVX2 where asked (and compiled: x86), else portable C. */
#if HAVE_X86
#define BODY(simd, avx2_call, c_call) do { if (simd) avx2_call; else c_call; } while (0)
#else
#define BODY(simd, avx2_call, c_call) do { (void)(simd); c_call; } while (0)
#endif

#if HAVE_X86
__attribute__((target("avx2,f16c")))
static void halves_avx2(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}
#endif

static void halves_to_floats(const uint16_t *src, int64_t n, float *dst, int simd) {
#if HAVE_X86
    if (simd) { halves_avx2(src, n, dst); return; }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

/* Returns 0, or -1 when half scales could not get their float buffer (y untouched). */
int int4_block_mm(const uint8_t *qs, const void *scale, const void *mins, int half, int64_t N,
                  int64_t K, int64_t group, const int8_t *xq, const float *xd,
                  const int32_t *xs, int64_t M, float *y, int simd, int threads) {
    const int64_t G = K / group, step = chunk_rows(N, threads);
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(|:failed)
    for (int64_t n0 = 0; n0 < N; n0 += step) {
        const int64_t n1 = n0 + step < N ? n0 + step : N, rows = n1 - n0;
        const float *sc = (const float *)scale + n0 * G, *mn = (const float *)mins + n0 * G;
        float *buf = NULL;
#if HAVE_X86
        if (simd && half && M == 1 && group == QK && K / QK <= ROW1_MAX_BLOCKS) {
            int4_row1_g32_avx2(n0, n1, qs, scale, mins, 1, xq, xd, xs, K / QK, y);
            continue;
        }
#endif
        if (half) {   /* this chunk's scales as floats: G * rows * 2 values, in L2 */
            buf = malloc(sizeof(float) * 2 * rows * G);
            if (!buf) { failed = 1; continue; }
            halves_to_floats((const uint16_t *)scale + n0 * G, rows * G, buf, simd);
            halves_to_floats((const uint16_t *)mins + n0 * G, rows * G, buf + rows * G, simd);
            sc = buf;
            mn = buf + rows * G;
        }
        /* The body sees rows 0 .. rows-1 of the chunk: weights, scales and y shifted. */
        BODY(simd, int4_rows_avx2(0, rows, qs + n0 * (K / 2), sc, mn, G, group, xq, xd, xs, M,
                                  K, y + n0, N),
             int4_rows_c(0, rows, qs + n0 * (K / 2), sc, mn, G, group, xq, xd, xs, M, K,
                         y + n0, N));
        free(buf);
    }
    return failed ? -1 : 0;
}

void int8_block_mm(const int8_t *q, const float *scale, int64_t N, int64_t K, int64_t group,
                   const int8_t *xq, const float *xd, int64_t M, float *y, int simd,
                   int threads) {
    const int64_t G = K / group, step = chunk_rows(N, threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += step) {
        const int64_t n1 = n0 + step < N ? n0 + step : N;
        BODY(simd, int8_rows_avx2(n0, n1, q, scale, G, group, xq, xd, M, K, y, N),
             int8_rows_c(n0, n1, q, scale, G, group, xq, xd, M, K, y, N));
    }
}

/* ---- dequantization, for prefill ------------------------------------------------
 * At many activation rows the products are compute bound, where the BLAS's float
 * GEMM is several times faster than integer dot products on AVX2; the caller then
 * dequantizes the weight once per call (w: (N, K) float, overwritten) and multiplies
 * in float. Plain loops: the compiler vectorizes them. */

void int4_block_dequantize(const uint8_t *qs, const void *scale, const void *mins, int half,
                           int64_t N, int64_t K, int64_t group, float *w, int threads) {
    const int64_t G = K / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = qs + n * (K / 2);
        float *out = w + n * K;
        for (int64_t b = 0; b < K / QK; b++) {
            const int64_t g = n * G + b * QK / group;
            const float s = half ? half_to_float(((const uint16_t *)scale)[g])
                                 : ((const float *)scale)[g];
            const float m = half ? half_to_float(((const uint16_t *)mins)[g])
                                 : ((const float *)mins)[g];
            for (int j = 0; j < QK / 2; j++) {
                const uint8_t byte = row[b * (QK / 2) + j];
                out[b * QK + j] = (float)(byte & 15) * s + m;
                out[b * QK + j + QK / 2] = (float)(byte >> 4) * s + m;
            }
        }
    }
}

void int8_block_dequantize(const int8_t *q, const float *scale, int64_t N, int64_t K,
                           int64_t group, float *w, int threads) {
    const int64_t G = K / group;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++)
            w[n * K + k] = (float)q[n * K + k] * scale[n * G + k / group];
}
