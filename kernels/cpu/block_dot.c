/* Matrix products of float activations with int4 / int8 weights held in blocks of 32,
 * for CPU decode: the activations are quantized to int8 per block of 32 (as llama.cpp
 * does for its Q4/Q8 dot products), so the inner loop is an integer dot product of 32
 * lanes and each weight byte is read once per call whatever the number of rows M.
 *
 * Weights (N output rows, K inputs, K a multiple of 32, G = K / group groups):
 *   int4, in tiles of 16 output rows ("x16"; N a multiple of 16): W[n,k] = q * scale + min.
 *         qs holds tile t = n / 16, block b = k / 32 in 256 bytes at (t * K/32 + b) * 256,
 *         as 4 chunks of 64: byte 4r + j of chunk c holds inputs 32b + 4c + j (low nibble)
 *         and 32b + 16 + 4c + j (high nibble) of row 16t + r. So one 64-byte load is 4
 *         inputs of 16 rows, each row's 4 codes in one 32-bit lane: an integer dot
 *         instruction against 4 activation codes broadcast to every lane computes 16
 *         rows' partial sums at once, and the outputs come out in vector lanes with no
 *         horizontal sums (what makes a batch of a few activation rows cost little more
 *         than one; the interleaving is the idea of llama.cpp's repacked Q4 layouts).
 *         scale and min (N, G) float, or float16 (`half`: a GGUF's own, 2 bytes each
 *         instead of 4, which at batch 1 is an eighth of what a step reads), tiled the
 *         same way: the value of (n, g) at (t * G + g) * 16 + n % 16.
 *   int8, x16 too: W[n,k] = q * scale[n,g], q in [-127, 127] (GGUF's Q8_0 also holds
 *         -128, read correctly). q holds tile t's block b in 512 bytes at
 *         (t * K/32 + b) * 512, 8 chunks of 64: byte 4r + j of chunk c is input
 *         32b + 4c + j of row 16t + r. scale (N, G) float in the tile order of int4's.
 * Activations: x (M, K) float; quantize_rows writes xq (M, K) int8, xd (M, K/32) float
 * (the step of each block) and xs (M, K/32) int32 (each block's sum of codes, for min).
 * Output: y (M, N) float, overwritten.
 *
 * Every kernel has three bodies: portable C (here), AVX2 + FMA + F16C
 * (block_dot_avx2.c) and AVX-512 with VNNI (block_dot_avx512.c). The caller picks one
 * per call (`simd`, a BODY_ level), from the CPU's capability at run time, so a machine
 * tests every body it can execute. Rows of the output are split across OpenMP threads;
 * `threads` is the caller's torch thread count.
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

/* The widest body this CPU can run (the OS's saving of the wide registers included:
 * the compiler's cpu checks read it). */
int block_dot_best_body(void) {
#if HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vnni"))
        return BODY_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
        && __builtin_cpu_supports("f16c"))
        return BODY_AVX2;
#endif
    return BODY_C;
}

/* ---- activations --------------------------------------------------------------- */

/* Rows are split among the threads only for a prefill's many rows: a decode step's
 * few would pay more to start the team than they take (measured on a Zen 4, 256 x 1536
 * inputs: 0.61 ms on one thread, a third of that 576 x 1536 product's time there). */
#define QUANTIZE_ROWS_PER_TEAM 16

void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd,
                   int32_t *xs, int threads) {
    const int64_t nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= QUANTIZE_ROWS_PER_TEAM)
    for (int64_t r = 0; r < M * nb; r++) {
        const float *v = x + r * QK;
        float amax = 0.0f;
#pragma omp simd reduction(max:amax)
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        /* Round to nearest even by adding and taking off 1.5 * 2^23 (exact for the
         * codes' |v * inv| <= 127, the same as lrintf in the default rounding mode):
         * unlike the lrintf call, the loop vectorizes (a step quantizes about 3,300
         * inputs per layer and sequence). */
        int32_t sum = 0;
#pragma omp simd reduction(+:sum)
        for (int j = 0; j < QK; j++) {
            const float rounded = (v[j] * inv + 12582912.0f) - 12582912.0f;
            const int32_t q = (int32_t)rounded;
            xq[r * QK + j] = (int8_t)q;
            sum += q;
        }
        xd[r] = d;
        xs[r] = sum;
    }
}

/* ---- portable bodies ----------------------------------------------------------- */

/* One tile's block b of int4 codes against one block of activation codes a: the 16
 * rows' integer dots. */
static inline void tile_block_dots(const uint8_t *p, const int8_t *a, int32_t dot[TILE]) {
    for (int r = 0; r < TILE; r++) dot[r] = 0;
    for (int c = 0; c < 4; c++)
        for (int r = 0; r < TILE; r++)
            for (int j = 0; j < 4; j++) {
                const uint8_t v = p[c * 64 + 4 * r + j];
                dot[r] += (v & 15) * a[4 * c + j] + (v >> 4) * a[QK / 2 + 4 * c + j];
            }
}

void int4_rows_c(INT4_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {
        const uint8_t *tile = qs + t * nb * TILE_BYTES;
        for (int64_t m = 0; m < M; m++) {
            float acc[TILE] = {0};
            for (int64_t b = 0; b < nb; b++) {
                int32_t dot[TILE];
                tile_block_dots(tile + b * TILE_BYTES, xq + m * K + b * QK, dot);
                const float d = xd[m * nb + b], ds = d * (float)xs[m * nb + b];
                const int64_t at = (t * G + b / per_group) * TILE;
                for (int r = 0; r < TILE; r++)
                    acc[r] += scale_at(scale, at + r, half) * d * (float)dot[r]
                            + scale_at(mins, at + r, half) * ds;
            }
            for (int r = 0; r < TILE; r++) y[m * N + t * TILE + r] = acc[r];
        }
    }
}

void int8_rows_c(INT8_BODY_ARGS) {
    const int64_t nb = K / QK, per_group = group / QK, G = K / group;
    (void)xs;
    for (int64_t t = n0 / TILE; t < n1 / TILE; t++) {
        const int8_t *tile = q + t * nb * TILE8_BYTES;
        for (int64_t m = 0; m < M; m++) {
            float acc[TILE] = {0};
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *p = tile + b * TILE8_BYTES, *a = xq + m * K + b * QK;
                const float d = xd[m * nb + b];
                const int64_t at = (t * G + b / per_group) * TILE;
                for (int r = 0; r < TILE; r++) {
                    int32_t dot = 0;
                    for (int c = 0; c < 8; c++)
                        for (int j = 0; j < 4; j++) dot += p[c * 64 + 4 * r + j] * a[4 * c + j];
                    acc[r] += scale[at + r] * d * (float)dot;
                }
            }
            for (int r = 0; r < TILE; r++) y[m * N + t * TILE + r] = acc[r];
        }
    }
}

/* Float weights: each weight row is read once from memory and stays in L1 while the M
 * activation rows pass over it, so a small batch costs about what one row does. */
void f32_rows_c(F32_BODY_ARGS) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += w[n * K + k] * x[m * K + k];
            y[m * N + n] = acc;
        }
}

/* ---- entry points: split the output rows across threads ------------------------ */

/* Rows per task: whole int4 tiles, and a multiple of 8 (a cache line of float outputs)
 * so threads never write the same line. */
static int64_t chunk_rows(int64_t N, int threads) {
    int64_t c = (N + threads - 1) / threads;
    return (c + TILE - 1) / TILE * TILE;
}

/* Every task of an entry point runs body(n0, n1, args...) over its rows, the body of
 * the caller's level (on a machine that is not x86, always the portable one). */
#if HAVE_X86
#define RUN_BODIES(N, threads, simd, kernel, ...) do {                                    \
    const int64_t step_ = chunk_rows(N, threads);                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                     \
    for (int64_t n0 = 0; n0 < (N); n0 += step_) {                                         \
        const int64_t n1 = n0 + step_ < (N) ? n0 + step_ : (N);                           \
        if ((simd) == BODY_AVX512) kernel##_avx512(n0, n1, __VA_ARGS__);                  \
        else if ((simd) == BODY_AVX2) kernel##_avx2(n0, n1, __VA_ARGS__);                 \
        else kernel##_c(n0, n1, __VA_ARGS__);                                             \
    }                                                                                     \
} while (0)
#else
#define RUN_BODIES(N, threads, simd, kernel, ...) do {                                    \
    const int64_t step_ = chunk_rows(N, threads);                                         \
    (void)(simd);                                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                     \
    for (int64_t n0 = 0; n0 < (N); n0 += step_)                                           \
        kernel##_c(n0, n0 + step_ < (N) ? n0 + step_ : (N), __VA_ARGS__);                 \
} while (0)
#endif

void int4_block_mm(const uint8_t *qs, const void *scale, const void *mins, int half, int64_t N,
                   int64_t K, int64_t group, const int8_t *xq, const float *xd,
                   const int32_t *xs, int64_t M, float *y, int simd, int threads) {
    RUN_BODIES(N, threads, simd, int4_rows, qs, scale, mins, half, group, xq, xd, xs, M, K,
               y, N);
}

void int8_block_mm(const int8_t *q, const float *scale, int64_t N, int64_t K, int64_t group,
                   const int8_t *xq, const float *xd, const int32_t *xs, int64_t M, float *y,
                   int simd, int threads) {
    RUN_BODIES(N, threads, simd, int8_rows, q, scale, group, xq, xd, xs, M, K, y, N);
}

void f32_mm(const float *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
            int simd, int threads) {
    RUN_BODIES(N, threads, simd, f32_rows, w, K, x, M, y, N);
}

/* ---- dequantization, for prefill ------------------------------------------------
 * At many activation rows the products are compute bound, where the BLAS's float
 * GEMM is several times faster than integer dot products on AVX2; the caller then
 * dequantizes the weight once per call (w: (N, K) float32, or bfloat16 where the CPU
 * multiplies bf16 in hardware; overwritten) and multiplies in that dtype. Plain loops:
 * the compiler vectorizes them. */

/* float -> bfloat16, round to nearest even (NaN kept a NaN). Branch-free, so the loop
 * over a block vectorizes. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1)) >> 16;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? (bits >> 16) | 0x40 : rounded);
}

/* A dequantized weight is written in runs of CHUNK values: computed in float32 straight
 * into w, or (bf16) into a float run on the stack and then rounded into w. Two plain
 * loops the compiler vectorizes (a per-element choice of the two stores did not: 3x
 * slower). */
#define CHUNK 256

static inline float *run_out(void *w, int64_t at, float *tmp, int bf16) {
    return bf16 ? tmp : (float *)w + at;
}

static inline void run_done(void *w, int64_t at, int64_t len, const float *tmp, int bf16) {
    if (!bf16) return;
    uint16_t *out = (uint16_t *)w + at;
    for (int64_t k = 0; k < len; k++) out[k] = float_to_bf16(tmp[k]);
}

/* Compiled three times and picked by the loader from the CPU (ifunc): plain loops, so
 * each clone is only the compiler's vectorization of them at that width, and every
 * clone computes the same values (no contraction into FMAs under -std=c11). */
#if HAVE_X86
#define WIDEST_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WIDEST_CLONES
#endif

/* Whether this CPU converts to bfloat16 in hardware (AVX512_BF16; with the AVX-512
 * body's own needs). */
static int has_avx512_bf16(void) {
#if HAVE_X86
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = block_dot_best_body() == BODY_AVX512 && __builtin_cpu_supports("avx512bf16");
    }
    return known;
#else
    return 0;
#endif
}

/* Row n of an x16 int4 weight in the plain order of GGUF's blocks (16 bytes a block,
 * byte j holding inputs j and j + 16) and its G scales and mins as floats. */
static void int4_row_view(const uint8_t *qs, const void *scale, const void *mins, int half,
                          int64_t n, int64_t K, int64_t G, uint8_t *row, float *s, float *m) {
    const int64_t nb = K / QK, r = n % TILE;
    const uint8_t *tile = qs + (n / TILE) * nb * TILE_BYTES;
    for (int64_t b = 0; b < nb; b++)
        for (int c = 0; c < 4; c++)
            memcpy(row + b * (QK / 2) + 4 * c, tile + b * TILE_BYTES + c * 64 + 4 * r, 4);
    for (int64_t g = 0; g < G; g++) {
        s[g] = scale_at(scale, tiled_at(n, g, G), half);
        m[g] = scale_at(mins, tiled_at(n, g, G), half);
    }
}

WIDEST_CLONES
void int4_block_dequantize(const uint8_t *qs, const void *scale, const void *mins, int half,
                           int64_t N, int64_t K, int64_t group, void *w, int bf16,
                           int threads) {
    const int64_t G = K / group, per_group = group / QK;
#pragma omp parallel num_threads(threads)
    {
        uint8_t row[K / 2];          /* one row's view per thread (K / 2 + 8 G bytes) */
        float s[G], m[G];
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            int4_row_view(qs, scale, mins, half, n, K, G, row, s, m);
#if HAVE_X86
            if (bf16 && has_avx512_bf16()) {
                int4_row_to_bf16_avx512(row, s, m, 0, 0, per_group, K / QK,
                                        (uint16_t *)w + n * K);
                continue;
            }
#endif
            float tmp[CHUNK];
            for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
                const int64_t len = K - k0 < CHUNK ? K - k0 : CHUNK;   /* whole blocks */
                float *out = run_out(w, n * K + k0, tmp, bf16);
                for (int64_t b = 0; b < len / QK; b++) {
                    const int64_t g = (k0 / QK + b) / per_group;
                    const uint8_t *p = row + (k0 / QK + b) * (QK / 2);
                    for (int j = 0; j < QK / 2; j++) {
                        out[b * QK + j] = (float)(p[j] & 15) * s[g] + m[g];
                        out[b * QK + j + QK / 2] = (float)(p[j] >> 4) * s[g] + m[g];
                    }
                }
                run_done(w, n * K + k0, len, tmp, bf16);
            }
        }
    }
}

WIDEST_CLONES
void int8_block_dequantize(const int8_t *q, const float *scale, int64_t N, int64_t K,
                           int64_t group, void *w, int bf16, int threads) {
    const int64_t G = K / group, nb = K / QK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *tile = q + (n / TILE) * nb * TILE8_BYTES + 4 * (n % TILE);
        float tmp[CHUNK];
        for (int64_t k0 = 0; k0 < K; k0 += CHUNK) {
            const int64_t len = K - k0 < CHUNK ? K - k0 : CHUNK;   /* whole blocks */
            float *out = run_out(w, n * K + k0, tmp, bf16);
            for (int64_t k = 0; k < len; k++) {
                const int64_t i = k0 + k;          /* block i / 32, chunk i % 32 / 4 */
                out[k] = (float)tile[(i / QK) * TILE8_BYTES + (i % QK / 4) * 64 + i % 4]
                         * scale[tiled_at(n, i / group, G)];
            }
            run_done(w, n * K + k0, len, tmp, bf16);
        }
    }
}
