/* One decode step of a LLaMA decoder on the CPU, every layer, in one call: for S
 * sequences that each add one token, RMSNorm -> QKV -> RoPE -> K/V into the paged
 * cache -> attention over the cache -> O -> residual -> RMSNorm -> gate/up -> SiLU *
 * up -> down -> residual, for each layer in turn.
 *
 * Why one call: at batch 1 a step of a small model is hundreds of tiny tensor ops
 * (norms, RoPE, the cache write, the KV gather, softmax), each a few microseconds of
 * dispatch and allocation, which together cost more than the matrix products (the
 * decode issue measured 26 ms of them per SmolLM2 step against 24 ms of products at
 * one thread). Here the loop over layers is C and the products are block_dot.c's
 * integer kernels on activations quantized per input, or float dot products.
 *
 * Scope: float32 activations, float32 KV cache, linears as block_dot.c takes them
 * (int4 blocks with scale and min, or int8 with a scale per group) or float32, no
 * biases. The caller (colocate/worker/cpu_decode.py) keeps the torch path for anything
 * else.
 *
 * Layouts (as colocate/model/attention_metadata.py defines them):
 *   h          (S, hidden) float, the residual stream: read, and overwritten with the
 *              output of the last layer (before the final norm)
 *   cache      (num_blocks, block_size, kv_heads, head_dim) float, keys and values
 *   tables     (S, max_blocks) int64 block ids; slots (S,) int64; positions (S,) int64:
 *              sequence s attends to its positions[s] + 1 first tokens
 *   cos_sin    (max_pos, 2, head_dim): cos and the sign-folded sin of rope.py, so that
 *              rotate(x)[i] = x[i] * cos[i] + x[(i + hd/2) % hd] * sin[i]
 */
#include "block_dot.h"   /* the block-dot kernels, linked into the same library */

/* Mirrored by ctypes Structures in colocate/worker/cpu_decode.py: change both. */
typedef struct {
    int64_t bits;                  /* 4, 8, or 32 (float weights, no scales) */
    const void *q;                 /* int4: (N, K/2) uint8; int8: (N, K) int8; float (N, K) */
    const void *scale;             /* (N, K / group) float; int4 also float16 (half) */
    const void *mins;              /* int4 only: (N, K / group), as scale */
    int64_t N, K, group, half;
} QLinear;

typedef struct {
    const float *attn_norm, *mlp_norm;     /* (hidden,) */
    QLinear qkv, o, gate_up, down;
    float *key_cache, *value_cache;
} DecoderLayer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, num_layers, block_size;
    double eps, scale;                     /* RMSNorm epsilon; attention's 1/sqrt(hd) */
    const float *cos_sin;
    const DecoderLayer *layers;
} DecodeModel;

/* Activations of one linear's input, quantized once and read by each linear of it. */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
} QuantizedRows;

/* Float weights: y (M, N) = x (M, K) @ w (N, K).T. Each weight row is read once from
 * memory and stays in L1 while the M activation rows pass over it, so a small batch
 * costs about what one row does (the weights are the traffic). */
static void f32_rows_c(int64_t n0, int64_t n1, const float *w, int64_t K, const float *x,
                       int64_t M, float *y, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += w[n * K + k] * x[m * K + k];
            y[m * N + n] = acc;
        }
}

#if HAVE_X86
__attribute__((target("avx2,fma")))
static void f32_rows_avx2(int64_t n0, int64_t n1, const float *w, int64_t K, const float *x,
                          int64_t M, float *y, int64_t N) {
    for (int64_t n = n0; n < n1; n++) {
        const float *row = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *a = x + m * K;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                             _mm256_setzero_ps()};
            int64_t k = 0;
            for (; k + 32 <= K; k += 32)
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(row + k + 8 * u),
                                             _mm256_loadu_ps(a + k + 8 * u), acc[u]);
            __m256 v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float tail = 0.0f;
            for (; k < K; k++) tail += row[k] * a[k];
            y[m * N + n] = _mm_cvtss_f32(h) + tail;
        }
    }
}
#endif

static void f32_linear(const float *w, int64_t N, int64_t K, const float *x, int64_t M,
                       float *y, int simd, int threads) {
    const int64_t step = ((N + threads - 1) / threads + 7) / 8 * 8;   /* whole cache lines of y */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += step) {
        const int64_t n1 = n0 + step < N ? n0 + step : N;
#if HAVE_X86
        if (simd) { f32_rows_avx2(n0, n1, w, K, x, M, y, N); continue; }
#endif
        f32_rows_c(n0, n1, w, K, x, M, y, N);
    }
}

/* y (M, N) = x (M, K) through one linear; a quantized one first quantizes x into q.
 * Returns 0, or -1 when the int4 kernel could not allocate. */
static int linear(const QLinear *w, const float *x, int64_t M, const QuantizedRows *q,
                  float *y, int simd, int threads) {
    if (w->bits == 32) {
        f32_linear((const float *)w->q, w->N, w->K, x, M, y, simd, threads);
        return 0;
    }
    quantize_rows(x, M, w->K, q->q, q->d, q->s);
    if (w->bits == 4)
        return int4_block_mm((const uint8_t *)w->q, w->scale, w->mins, (int)w->half, w->N,
                             w->K, w->group, q->q, q->d, q->s, M, y, simd, threads);
    int8_block_mm((const int8_t *)w->q, (const float *)w->scale, w->N, w->K, w->group, q->q,
                  q->d, M, y, simd, threads);
    return 0;
}

/* HF's RMSNorm in float32: weight * (x * rsqrt(mean(x^2) + eps)). */
static void rms_norm(const float *x, const float *weight, int64_t M, int64_t H, double eps,
                     float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * H;
        float ss = 0.0f;
        for (int64_t i = 0; i < H; i++) ss += row[i] * row[i];
        const float r = 1.0f / sqrtf(ss / (float)H + (float)eps);
        for (int64_t i = 0; i < H; i++) out[m * H + i] = weight[i] * (row[i] * r);
    }
}

/* Rotate `heads` vectors of head_dim at x in place by position row cs (2, hd). */
static void rope(float *x, int64_t heads, int64_t hd, const float *cs, float *tmp) {
    const float *cos = cs, *sin = cs + hd;
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd;
        memcpy(tmp, v, (size_t)hd * sizeof(float));
        for (int64_t i = 0; i < hd; i++)
            v[i] = tmp[i] * cos[i] + tmp[(i + half) % hd] * sin[i];
    }
}

/* Softmax attention of one query head over the first `len` tokens of a sequence's
 * paged cache: two passes over the keys (scores, then weighted values). */
static void attend_head(const float *q, const DecodeModel *m, const DecoderLayer *layer,
                        const int64_t *table, int64_t len, int64_t kv_head, float *scores,
                        float *out) {
    const int64_t hd = m->head_dim, nkv = m->kv_heads, bs = m->block_size;
    const float scale = (float)m->scale;
    float top = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float *k = layer->key_cache + ((table[t / bs] * bs + t % bs) * nkv + kv_head) * hd;
        float dot = 0.0f;
#pragma omp simd reduction(+:dot)
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
        const float *v = layer->value_cache + ((table[t / bs] * bs + t % bs) * nkv + kv_head) * hd;
        const float p = scores[t] / total;
#pragma omp simd
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Returns 0, or -1 when a workspace allocation failed (nothing was written then). */
int decode_step(const DecodeModel *m, int64_t S, const int64_t *positions, const int64_t *slots,
                const int64_t *tables, int64_t max_blocks, float *h, int simd, int threads) {
    const int64_t H = m->hidden, hd = m->head_dim, nh = m->heads, nkv = m->kv_heads;
    const int64_t I = m->intermediate, qkv_w = (nh + 2 * nkv) * hd, group = nh / nkv;
    int64_t longest = 0;
    for (int64_t s = 0; s < S; s++) longest = max64(longest, positions[s] + 1);
    const int64_t widest = max64(max64(H, nh * hd), I);     /* any linear's input */

    float *xn = malloc(sizeof(float) * S * H), *qkv = malloc(sizeof(float) * S * qkv_w);
    float *attn = malloc(sizeof(float) * S * nh * hd), *tmp = malloc(sizeof(float) * S * H);
    float *gu = malloc(sizeof(float) * S * 2 * I), *act = malloc(sizeof(float) * S * I);
    float *scores = malloc(sizeof(float) * S * nh * longest), *rot = malloc(sizeof(float) * hd);
    QuantizedRows x = {malloc((size_t)S * widest), malloc(sizeof(float) * S * widest / QK),
                       malloc(sizeof(int32_t) * S * widest / QK)};
    int ok = xn && qkv && attn && tmp && gu && act && scores && rot && x.q && x.d && x.s;

    for (int64_t l = 0; ok && l < m->num_layers; l++) {
        const DecoderLayer *L = m->layers + l;
        rms_norm(h, L->attn_norm, S, H, m->eps, xn);
        ok = ok && linear(&L->qkv, xn, S, &x, qkv, simd, threads) == 0;     /* (S, qkv_w) */
        for (int64_t s = 0; s < S; s++) {
            float *row = qkv + s * qkv_w;                             /* q | k | v heads */
            rope(row, nh + nkv, hd, m->cos_sin + positions[s] * 2 * hd, rot);
            const int64_t at = slots[s] * nkv * hd;
            memcpy(L->key_cache + at, row + nh * hd, sizeof(float) * nkv * hd);
            memcpy(L->value_cache + at, row + (nh + nkv) * hd, sizeof(float) * nkv * hd);
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < S * nh; task++) {
            const int64_t s = task / nh, head = task % nh;
            attend_head(qkv + s * qkv_w + head * hd, m, L, tables + s * max_blocks,
                        positions[s] + 1, head / group, scores + task * longest,
                        attn + task * hd);
        }
        ok = ok && linear(&L->o, attn, S, &x, tmp, simd, threads) == 0;  /* (S, H) */
        for (int64_t i = 0; i < S * H; i++) h[i] += tmp[i];

        rms_norm(h, L->mlp_norm, S, H, m->eps, xn);
        /* (S, 2I): gate | up */
        ok = ok && linear(&L->gate_up, xn, S, &x, gu, simd, threads) == 0;
        for (int64_t s = 0; s < S; s++)
            for (int64_t i = 0; i < I; i++) {
                const float g = gu[s * 2 * I + i];
                act[s * I + i] = g / (1.0f + expf(-g)) * gu[s * 2 * I + I + i];
            }
        ok = ok && linear(&L->down, act, S, &x, tmp, simd, threads) == 0;  /* (S, H) */
        for (int64_t i = 0; i < S * H; i++) h[i] += tmp[i];
    }
    free(xn); free(qkv); free(attn); free(tmp); free(gu); free(act); free(scores); free(rot);
    free(x.q); free(x.d); free(x.s);
    return ok ? 0 : -1;
}
