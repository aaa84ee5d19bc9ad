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
    const void *q;                 /* x16 int4: (N, K/2) uint8, int8: (N, K) int8; float (N, K) */
    const void *scale;             /* (N, K / group) float, x16 order; int4 also float16 */
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

/* y (M, N) = x (M, K) through one linear; a quantized one first quantizes x into q. */
static void linear(const QLinear *w, const float *x, int64_t M, const QuantizedRows *q,
                   float *y, int simd, int threads) {
    if (w->bits == 32) {
        f32_mm((const float *)w->q, w->N, w->K, x, M, y, simd, threads);
        return;
    }
    quantize_rows(x, M, w->K, q->q, q->d, q->s, threads);
    if (w->bits == 4)
        int4_block_mm((const uint8_t *)w->q, w->scale, w->mins, (int)w->half, w->N, w->K,
                      w->group, q->q, q->d, q->s, M, y, simd, threads);
    else
        int8_block_mm((const int8_t *)w->q, (const float *)w->scale, w->N, w->K, w->group,
                      q->q, q->d, q->s, M, y, simd, threads);
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

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* The step's scratch, carved from one caller-owned buffer (no allocation per step): the
 * plan keeps it and grows it when a batch is wider or a sequence longer than before. */
typedef struct {
    float *xn, *qkv, *attn, *tmp, *gu, *act, *scores, *rot;
    QuantizedRows x;
} Workspace;

/* Carves ws from `base` (NULL: only counts); returns the bytes it takes. Every piece
 * starts on a 64-byte line. */
static int64_t carve(const DecodeModel *m, int64_t S, int64_t longest, char *base,
                     Workspace *ws) {
    const int64_t H = m->hidden, hd = m->head_dim, nh = m->heads, nkv = m->kv_heads;
    const int64_t I = m->intermediate, widest = max64(max64(H, nh * hd), I);
    const int64_t sizes[] = {4 * S * H, 4 * S * (nh + 2 * nkv) * hd, 4 * S * nh * hd,
                             4 * S * H, 4 * S * 2 * I, 4 * S * I, 4 * S * nh * longest, 4 * hd,
                             S * widest, 4 * S * widest / QK, 4 * S * widest / QK};
    void **slots[] = {(void **)&ws->xn, (void **)&ws->qkv, (void **)&ws->attn,
                      (void **)&ws->tmp, (void **)&ws->gu, (void **)&ws->act,
                      (void **)&ws->scores, (void **)&ws->rot, (void **)&ws->x.q,
                      (void **)&ws->x.d, (void **)&ws->x.s};
    int64_t at = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        if (base) *slots[i] = base + at;
        at += (sizes[i] + 63) / 64 * 64;
    }
    return at;
}

/* The workspace bytes a step of S sequences, the longest attending to `longest`
 * tokens, needs. */
int64_t decode_step_workspace(const DecodeModel *m, int64_t S, int64_t longest) {
    Workspace unused;
    return carve(m, S, longest, NULL, &unused);
}

/* Returns 0, or -1 when `work` (work_bytes long) is smaller than the step needs
 * (nothing was written then). */
int decode_step(const DecodeModel *m, int64_t S, const int64_t *positions, const int64_t *slots,
                const int64_t *tables, int64_t max_blocks, float *h, void *work,
                int64_t work_bytes, int simd, int threads) {
    const int64_t H = m->hidden, hd = m->head_dim, nh = m->heads, nkv = m->kv_heads;
    const int64_t I = m->intermediate, qkv_w = (nh + 2 * nkv) * hd, group = nh / nkv;
    int64_t longest = 0;
    for (int64_t s = 0; s < S; s++) longest = max64(longest, positions[s] + 1);
    Workspace ws;
    if (decode_step_workspace(m, S, longest) > work_bytes) return -1;
    carve(m, S, longest, (char *)work, &ws);
    float *xn = ws.xn, *qkv = ws.qkv, *attn = ws.attn, *tmp = ws.tmp, *gu = ws.gu;
    float *act = ws.act, *scores = ws.scores, *rot = ws.rot;
    const QuantizedRows x = ws.x;

    for (int64_t l = 0; l < m->num_layers; l++) {
        const DecoderLayer *L = m->layers + l;
        rms_norm(h, L->attn_norm, S, H, m->eps, xn);
        linear(&L->qkv, xn, S, &x, qkv, simd, threads);     /* (S, qkv_w) */
        for (int64_t s = 0; s < S; s++) {
            float *row = qkv + s * qkv_w;                             /* q | k | v heads */
            rope(row, nh + nkv, hd, m->cos_sin + positions[s] * 2 * hd, rot);
            const int64_t at = slots[s] * nkv * hd;
            memcpy(L->key_cache + at, row + nh * hd, sizeof(float) * nkv * hd);
            memcpy(L->value_cache + at, row + (nh + nkv) * hd, sizeof(float) * nkv * hd);
        }
        /* One task per sequence and kv head: its `group` query heads read each cached
         * key and value once. */
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < S * nkv; task++) {
            const int64_t s = task / nkv, first = (task % nkv) * group;
            attend_group(simd, qkv + s * qkv_w + first * hd, L->key_cache, L->value_cache,
                         tables + s * max_blocks, positions[s] + 1, task % nkv, nkv, hd,
                         m->block_size, (float)m->scale, group, longest,
                         scores + (s * nh + first) * longest, attn + (s * nh + first) * hd);
        }
        linear(&L->o, attn, S, &x, tmp, simd, threads);  /* (S, H) */
        for (int64_t i = 0; i < S * H; i++) h[i] += tmp[i];

        rms_norm(h, L->mlp_norm, S, H, m->eps, xn);
        /* (S, 2I): gate | up */
        linear(&L->gate_up, xn, S, &x, gu, simd, threads);
        silu_mul(simd, gu, S, I, act);
        linear(&L->down, act, S, &x, tmp, simd, threads);  /* (S, H) */
        for (int64_t i = 0; i < S * H; i++) h[i] += tmp[i];
    }
    return 0;
}
