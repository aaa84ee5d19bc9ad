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
 * Every kernel has two bodies: portable C (here) and AVX2 + FMA + F16C
 * (block_dot_avx2.c). The caller picks one per call (`simd`), from the CPU's capability
 * at run time, so both are tested on any x86 machine. Rows of the output are split across OpenMP threads; `threads` is the
 * caller's torch thread count.
 */
#include "block_dot.h"

/* IEEE half -> float, exactly (normals, subnormals, inf, nan). */
float half_to_float(uint16_t h) {
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

void int4_rows_c(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
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

void int8_rows_c(int64_t n0, int64_t n1, const int8_t *q, const float *scale,
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
