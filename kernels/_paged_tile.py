"""Device helpers the paged attention kernels share: where a sequence's n-th token
lives in the paged cache, and loading a tile of tokens from there (dequantized).

Tokens are gathered one by one through the block table rather than a whole cache
block at a time, so a tile's width (BLOCK_N) is independent of the cache block size:
tl.dot wants tiles of at least 16, caches may use blocks of 8. Tokens of one block
are adjacent in memory, so the gather still reads contiguous runs.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Scores are kept in log2 units (q pre-multiplied by log2(e)) so every exponential is
# exp2, the one GPUs compute natively; the partial max / sum the split decode kernel
# writes are in the same units.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def paged_token_slots(table_row_ptr, n, valid, block_size):
    """Token positions n (N,) of one sequence -> (block id as int64, offset in block).

    int64 because block * block_stride overflows int32 once a cache passes 2**31
    elements, which a 13B model's pool does at a few thousand blocks.
    """
    block = tl.load(table_row_ptr + n // block_size, mask=valid, other=0).to(tl.int64)
    return block, n % block_size


@triton.jit
def paged_tile(table_row_ptr, n0, end, block_size, BLOCK_N: tl.constexpr):
    """The tile of token positions [n0, n0 + BLOCK_N) of one sequence, cut at `end`:
    positions n (N,), which are real (valid), and where each lives (block, offset)."""
    n = n0 + tl.arange(0, BLOCK_N)
    valid = n < end
    block, offset = paged_token_slots(table_row_ptr, n, valid, block_size)
    return n, valid, block, offset


@triton.jit
def load_kv_tile(cache_ptr, scale_ptr, block, offset, valid, kv_head, d, d_mask,
                 stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT: tl.constexpr):
    """(N, HD_P2) tile of one KV head: the cache's dtype, or fp32 dequantized if QUANT.

    Masked tokens and padded head dims read as 0 (finite, so a zero weight times them
    stays 0).
    """
    tok = block * stride_cb + offset * stride_cs + kv_head * stride_ch          # (N,) int64
    x = tl.load(cache_ptr + tok[:, None] + d[None, :],
                mask=valid[:, None] & d_mask[None, :], other=0.0)               # (N, HD_P2)
    if QUANT:
        s = tl.load(scale_ptr + block * stride_sb + offset * stride_ss + kv_head,
                    mask=valid, other=0.0)                                      # (N,)
        x = x.to(tl.float32) * s[:, None]
    return x


# The online softmax of both attention kernels (FlashAttention's recurrence): a running
# row max m, a running sum l of exp2(score - m) and an unnormalized output acc, rescaled
# by exp2(m_old - m_new) whenever a tile raises the max.
@triton.jit
def online_softmax_start(ROWS: tl.constexpr, HD_P2: tl.constexpr):
    """(m, l, acc) before the first tile: (ROWS,), (ROWS,), (ROWS, HD_P2), fp32."""
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HD_P2), tl.float32)
    return m_i, l_i, acc


@triton.jit
def online_softmax_step(m_i, l_i, acc, scores, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile in: scores (R, N) in log2 units, masked entries -inf; v (N, HD_P2)
    in the dot's dtype. The caller guarantees a finite max after this tile's row."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])                                  # (R, N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def online_softmax_finish(acc, l_i):
    """The normalized output (R, HD_P2); a row that saw no key (l = 0) stays 0."""
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
