/* What the CPU kernels' C files share (block_dot.c, block_dot_avx2.c, decode_step.c):
 * one library, built by colocate/quant/block_kernels.py from every file of this folder.
 * Layouts and semantics are documented at the top of block_dot.c. */
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
#define ROW1_MAX_BLOCKS 512    /* batch-1 loops keep per-row values of this many blocks */

float half_to_float(uint16_t h);

/* entry points (ctypes, and decode_step.c) */
void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd, int32_t *xs);
int int4_block_mm(const uint8_t *qs, const void *scale, const void *mins, int half, int64_t N,
                  int64_t K, int64_t group, const int8_t *xq, const float *xd,
                  const int32_t *xs, int64_t M, float *y, int simd, int threads);
void int8_block_mm(const int8_t *q, const float *scale, int64_t N, int64_t K, int64_t group,
                   const int8_t *xq, const float *xd, int64_t M, float *y, int simd,
                   int threads);

/* bodies over output rows [n0, n1): portable (block_dot.c) and AVX2 (block_dot_avx2.c) */
void int4_rows_c(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
                 const float *mins, int64_t G, int64_t group, const int8_t *xq,
                 const float *xd, const int32_t *xs, int64_t M, int64_t K, float *y,
                 int64_t N);
void int8_rows_c(int64_t n0, int64_t n1, const int8_t *q, const float *scale, int64_t G,
                 int64_t group, const int8_t *xq, const float *xd, int64_t M, int64_t K,
                 float *y, int64_t N);
#if HAVE_X86
void int4_rows_avx2(int64_t n0, int64_t n1, const uint8_t *qs, const float *scale,
                    const float *mins, int64_t G, int64_t group, const int8_t *xq,
                    const float *xd, const int32_t *xs, int64_t M, int64_t K, float *y,
                    int64_t N);
void int4_row1_g32_avx2(int64_t n0, int64_t n1, const uint8_t *qs, const void *scale,
                        const void *mins, int half, const int8_t *xq, const float *xd,
                        const int32_t *xs, int64_t nb, float *y);
void int8_rows_avx2(int64_t n0, int64_t n1, const int8_t *q, const float *scale, int64_t G,
                    int64_t group, const int8_t *xq, const float *xd, int64_t M, int64_t K,
                    float *y, int64_t N);
void halves_avx2(const uint16_t *src, int64_t n, float *dst);
#endif

#endif
