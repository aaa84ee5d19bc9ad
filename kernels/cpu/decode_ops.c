/* The decode step's work per sequence outside the matrix products (decode_step.c):
 * attention of one query head over its sequence's paged cache, and SiLU(gate) * up.
 * One body per ISA, chosen per call (`simd`, a BODY_ level) like block_dot.c's.
 *
 * Why vector bodies: with the products on integer dot products, these became the
 * step's growing part. Measured on a Zen 4 (2 threads, SmolLM2 as stored, three
 * sequences of 250-650 tokens): a step took 11-15 ms where one of three short
 * sequences took 6, the difference being scalar attention (a 64-wide dot, a scalar
 * expf and a 64-wide update per cached token and head) and a scalar expf per SiLU.
 *
 * Attention is the same two passes in every body (scores and their maximum; then
 * exp, sum and the weighted values), so the bodies differ in rounding only: the sums
 * of the dots run in another order, and the vector exp below is within 2 ulp of expf.
 */
#include "block_dot.h"

/* One query head q (hd,) into out (hd,), scores (len,) scratch: the C and AVX2 bodies,
 * which attend_group runs once per head of the group. */
#define HEAD_ARGS const float *q, const float *keys, const float *values, \
    const int64_t *table, int64_t len, int64_t kv_head, int64_t nkv, int64_t hd, int64_t bs, \
    float scale, float *scores, float *out

/* ---- portable C ------------------------------------------------------------------- */
static const float *cached(const float *cache, const int64_t *table, int64_t t, int64_t bs,
                           int64_t nkv, int64_t kv_head, int64_t hd) {
    return cache + ((table[t / bs] * bs + t % bs) * nkv + kv_head) * hd;
}

static void attend_head_c(HEAD_ARGS) {
    float top = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = cached(keys, table, t, bs, nkv, kv_head, hd);
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; i++) dot += q[i] * k[i];
        scores[t] = dot * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    memset(out, 0, (size_t)hd * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const float *v = cached(values, table, t, bs, nkv, kv_head, hd);
        const float p = scores[t] / total;
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

static void silu_mul_c(const float *gu, int64_t S, int64_t I, float *act) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t i = 0; i < I; i++) {
            const float g = gu[s * 2 * I + i];
            act[s * I + i] = g / (1.0f + expf(-g)) * gu[s * 2 * I + I + i];
        }
}

#if HAVE_X86
/* exp by Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, then
 * times 2^n. x is clamped to [-87.3, 88.3], where 2^n is a normal float (an attention
 * score's exp underflows to about 1e-38 instead of 0, which a softmax cannot tell). */
#define EXP_LO -87.33654f
#define EXP_HI 88.37626f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* ---- AVX2 + FMA ------------------------------------------------------------------- */
#define AVX2 __attribute__((target("avx2,fma"), always_inline)) static inline

AVX2 __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* hd a multiple of 8 (the caller checks). */
__attribute__((target("avx2,fma"))) static void attend_head_avx2(HEAD_ARGS) {
    float top = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = cached(keys, table, t, bs, nkv, kv_head, hd);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), acc);
        scores[t] = hsum8(acc) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    __m256 sum = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum8(sum);
    for (; t < len; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    memset(out, 0, (size_t)hd * sizeof(float));
    const float inv = 1.0f / total;
    for (t = 0; t < len; t++) {
        const float *v = cached(values, table, t, bs, nkv, kv_head, hd);
        const __m256 p = _mm256_set1_ps(scores[t] * inv);
        for (int64_t i = 0; i < hd; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i),
                                                      _mm256_loadu_ps(out + i)));
    }
}

__attribute__((target("avx2,fma"))) static void silu_mul_avx2(const float *gu, int64_t S,
                                                             int64_t I, float *act) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t s = 0; s < S; s++) {
        const float *gate = gu + s * 2 * I, *up = gate + I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_storeu_ps(act + s * I + i, _mm256_mul_ps(
                _mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
        }
        for (; i < I; i++) act[s * I + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}

/* ---- AVX-512 F ---------------------------------------------------------------------- */
#define AVX512 __attribute__((target("avx512f"), always_inline)) static inline

AVX512 __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* hd a multiple of 16 and at most 256 (the caller checks). Each cached key and value
 * is loaded once for all the heads of its group. */
__attribute__((target("avx512f"))) static void attend_group_avx512(ATTEND_ARGS) {
    const int64_t nv = hd / 16;
    float tops[heads], inv_sums[heads];
    for (int64_t j = 0; j < heads; j++) tops[j] = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = cached(keys, table, t, bs, nkv, kv_head, hd);
        __m512 kv[16];
        for (int64_t i = 0; i < nv; i++) kv[i] = _mm512_loadu_ps(k + 16 * i);
        for (int64_t j = 0; j < heads; j++) {
            const float *qj = q + j * hd;
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qj), kv[0]);
            for (int64_t i = 1; i < nv; i++)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16 * i), kv[i], acc);
            const float sc = _mm512_reduce_add_ps(acc) * scale;
            scores[j * stride + t] = sc;
            tops[j] = sc > tops[j] ? sc : tops[j];
        }
    }
    for (int64_t j = 0; j < heads; j++) {
        float *sj = scores + j * stride;
        const __m512 top = _mm512_set1_ps(tops[j]);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; t += 16) {
            const __mmask16 m = len - t >= 16 ? (__mmask16)0xFFFF
                                              : (__mmask16)((1u << (len - t)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sj + t), top));
            _mm512_mask_storeu_ps(sj + t, m, e);
            sum = _mm512_mask_add_ps(sum, m, sum, e);
        }
        inv_sums[j] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    memset(out, 0, (size_t)(heads * hd) * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const float *v = cached(values, table, t, bs, nkv, kv_head, hd);
        __m512 vv[16];
        for (int64_t i = 0; i < nv; i++) vv[i] = _mm512_loadu_ps(v + 16 * i);
        for (int64_t j = 0; j < heads; j++) {
            const __m512 p = _mm512_set1_ps(scores[j * stride + t] * inv_sums[j]);
            float *oj = out + j * hd;
            for (int64_t i = 0; i < nv; i++)
                _mm512_storeu_ps(oj + 16 * i, _mm512_fmadd_ps(p, vv[i], _mm512_loadu_ps(oj + 16 * i)));
        }
    }
}

__attribute__((target("avx512f"))) static void silu_mul_avx512(const float *gu, int64_t S,
                                                              int64_t I, float *act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t s = 0; s < S; s++) {
        const float *gate = gu + s * 2 * I, *up = gate + I;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) {
            const __m512 g = _mm512_loadu_ps(gate + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            _mm512_storeu_ps(act + s * I + i, _mm512_mul_ps(
                _mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
        }
        for (; i < I; i++) act[s * I + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
#endif

void attend_group(int simd, ATTEND_ARGS) {
#if HAVE_X86
    if (simd == BODY_AVX512 && hd % 16 == 0 && hd <= 256) {
        attend_group_avx512(q, keys, values, table, len, kv_head, nkv, hd, bs, scale, heads,
                            stride, scores, out);
        return;
    }
#endif
    for (int64_t j = 0; j < heads; j++) {
        const float *qj = q + j * hd;
        float *sj = scores + j * stride, *oj = out + j * hd;
#if HAVE_X86
        if (simd >= BODY_AVX2 && hd % 8 == 0) {
            attend_head_avx2(qj, keys, values, table, len, kv_head, nkv, hd, bs, scale, sj, oj);
            continue;
        }
#endif
        attend_head_c(qj, keys, values, table, len, kv_head, nkv, hd, bs, scale, sj, oj);
    }
}

void silu_mul(int simd, const float *gu, int64_t S, int64_t I, float *act) {
#if HAVE_X86
    if (simd == BODY_AVX512) {
        silu_mul_avx512(gu, S, I, act);
        return;
    }
    if (simd == BODY_AVX2) {
        silu_mul_avx2(gu, S, I, act);
        return;
    }
#endif
    (void)simd;
    silu_mul_c(gu, S, I, act);
}
