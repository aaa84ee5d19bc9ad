/* What the CPU kernels' C files share (block_dot.c, block_dot_avx2.c, block_dot_avx512.c,
 * decode_step.c): one library, built by colocate/quant/block_kernels.py from every file
 * of this folder. Layouts and semantics are documented at the top of block_dot.c. */
#ifndef COLOCATE_BLOCK_DOT_H
#define COLOCATE_BLOCK_DOT_H

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

#define QK 32                  /* inputs per block: one activation step, one weight scale */
#define TILE 16                /* output rows per tile of the x16 layouts */
#define TILE_BYTES (TILE * QK / 2)   /* one tile's block of int4 codes */
#define TILE8_BYTES (TILE * QK)      /* one tile's block of int8 codes */
/* How far ahead of its reads a weight stream prefetches, in bytes. A decode step
 * streams every weight once from memory, and at batch 1 the hardware prefetcher alone
 * left the SmolLM2 step (1 thread, AVX-512 Xeon) at about half the read bandwidth a
 * plain sum gets; measured ahead by 0 / 512 / 1024 / 2048 / 4096 bytes: 9.3 / 8.5 /
 * 7.5 / 6.5 / 6.2 ms a step (loaded machine: minima of 40). */
#define PREFETCH_BYTES 4096

#if HAVE_X86
/* Asks for the cache lines PREFETCH_BYTES ahead of a weight block of `bytes` at p. */
__attribute__((always_inline)) static inline void prefetch_ahead(const void *p, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64)
        _mm_prefetch((const char *)p + PREFETCH_BYTES + l, _MM_HINT_T0);
}
#endif

/* Which body a call runs (`simd`), chosen by the caller from the CPU at run time. */
enum { BODY_C = 0, BODY_AVX2 = 1, BODY_AVX512 = 2 };

float half_to_float(uint16_t h);

/* Scale (or min) i of a weight's scales, float32 or float16 (`half`), read in place. */
static inline float scale_at(const void *p, int64_t i, int half) {
    return half ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Where a scale (or int4 min) of row n, group g sits in the x16 layout (G groups). */
static inline int64_t tiled_at(int64_t n, int64_t g, int64_t G) {
    return ((n / TILE) * G + g) * TILE + n % TILE;
}

/* entry points (ctypes, and decode_step.c) */
void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd, int32_t *xs,
                   int threads);
void int4_block_mm(const uint8_t *qs, const void *scale, const void *mins, int half, int64_t N,
                   int64_t K, int64_t group, const int8_t *xq, const float *xd,
                   const int32_t *xs, int64_t M, float *y, int simd, int threads);
void int8_block_mm(const int8_t *q, const float *scale, int64_t N, int64_t K, int64_t group,
                   const int8_t *xq, const float *xd, const int32_t *xs, int64_t M, float *y,
                   int simd,
                   int threads);
void f32_mm(const float *w, int64_t N, int64_t K, const float *x, int64_t M, float *y,
            int simd, int threads);

/* Bodies over output rows [n0, n1) of y (M, N), whole tiles of TILE rows: portable C (block_dot.c), AVX2 + FMA +
 * F16C (block_dot_avx2.c) and AVX-512 with VNNI (block_dot_avx512.c). One signature per
 * kernel, so the entry points pick a body with one switch. */
#define INT4_BODY_ARGS int64_t n0, int64_t n1, const uint8_t *qs, const void *scale, \
    const void *mins, int half, int64_t group, const int8_t *xq, const float *xd,   \
    const int32_t *xs, int64_t M, int64_t K, float *y, int64_t N
#define INT8_BODY_ARGS int64_t n0, int64_t n1, const int8_t *q, const float *scale, \
    int64_t group, const int8_t *xq, const float *xd, const int32_t *xs, int64_t M,    \
    int64_t K, float *y, int64_t N
#define F32_BODY_ARGS int64_t n0, int64_t n1, const float *w, int64_t K, const float *x, \
    int64_t M, float *y, int64_t N

void int4_rows_c(INT4_BODY_ARGS);
void int8_rows_c(INT8_BODY_ARGS);
void f32_rows_c(F32_BODY_ARGS);
#if HAVE_X86
void int4_rows_avx2(INT4_BODY_ARGS);
void int8_rows_avx2(INT8_BODY_ARGS);
void f32_rows_avx2(F32_BODY_ARGS);
void int4_rows_avx512(INT4_BODY_ARGS);
void int8_rows_avx512(INT8_BODY_ARGS);
void f32_rows_avx512(F32_BODY_ARGS);
void int4_row_to_bf16_avx512(const uint8_t *row, const void *scale, const void *mins,
                             int half, int64_t at, int64_t per_group, int64_t nb,
                             uint16_t *out);
#endif

/* decode_ops.c: the `heads` query heads q (heads, hd) that share kv head `kv_head` of a
 * decode step attending to the first `len` tokens of their sequence's paged cache
 * (keys, values (blocks, bs, nkv, hd) float; table the sequence's block ids), into out
 * (heads, hd); scores (heads rows `stride` >= len apart) is scratch. And SiLU(gate) * up
 * for S rows of gu (S, 2I) = gate | up, into act (S, I). */
#define ATTEND_ARGS const float *q, const float *keys, const float *values, \
    const int64_t *table, int64_t len, int64_t kv_head, int64_t nkv, int64_t hd, int64_t bs, \
    float scale, int64_t heads, int64_t stride, float *scores, float *out
void attend_group(int simd, ATTEND_ARGS);
void silu_mul(int simd, const float *gu, int64_t S, int64_t I, float *act);

#endif
