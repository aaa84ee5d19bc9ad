"""Causal attention for a flat batch of query chunks over a paged KV cache.

Sequence i's queries are rows query_start_loc[i] : query_start_loc[i + 1] of the flat
batch and sit at positions context_len .. seq_len - 1, where context_len = seq_len -
query_len tokens were cached by earlier steps (a chunked or prefix-cached prefill; a
fresh prefill has context_len 0). The step's own K/V must already be in the cache
(reshape_and_cache), so every key, old or new, is read through the block table.

Grid (sequence, query head, block of BLOCK_M queries). A program walks keys
0 .. (its last query's position) BLOCK_N at a time with an online softmax; the causal
mask only bites in the last tiles. Mixed batches (some sequences decoding, some
prefilling) also run here: a decode is a chunk of one query.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import (INDEX_DTYPES, check_device, check_queries_against_cache,
                                      check_tensor, interpreting, next_pow2)
from colocate.kernels._paged_tile import LOG2E, load_kv_tile, paged_token_slots

DEFAULT_BLOCK_M = 16
DEFAULT_BLOCK_N = 16


@triton.jit
def _paged_prefill_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
    block_size,
    GROUP: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    context_len = seq_len - q_len
    kv_head = head // GROUP

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HD_P2)
    m_mask = m < q_len
    d_mask = d < HD
    rows = (q_start + m).to(tl.int64)                                        # (M,) flat rows
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)            # (M, HD_P2)
    if DOT_F32:
        q = q.to(tl.float32)    # both dots follow q's dtype
    q_pos = context_len + m                                                   # (M,)
    qk_scale = scale * LOG2E

    # Keys this block of queries can see end at its last query's position; a block
    # past the end of the chunk has nothing to do.
    hi = tl.minimum(seq_len, context_len + (m_block + 1) * BLOCK_M)
    hi = tl.where(m_block * BLOCK_M < q_len, hi, 0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HD_P2), tl.float32)
    table = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < hi
        block, offset = paged_token_slots(table, n, valid, block_size)
        k = load_kv_tile(key_cache_ptr, key_scale_ptr, block, offset, valid, kv_head, d, d_mask,
                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # (M, N)
        scores = scores * qk_scale
        visible = valid[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Key 0 is in the first tile and every query sees it, so after that tile m_i
        # is finite for every row and a fully masked later tile adds exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])                                  # (M, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv_tile(value_cache_ptr, value_scale_ptr, block, offset, valid, kv_head, d,
                         d_mask, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype),
                                            input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int, scale: float, *,
                            key_scale: torch.Tensor | None = None,
                            value_scale: torch.Tensor | None = None,
                            out: torch.Tensor | None = None, block_m: int = DEFAULT_BLOCK_M,
                            block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """q (T, nh, hd), the flat batch of query chunks -> (T, nh, hd).

    query_start_loc (S + 1,) and seq_lens (S,) as in AttentionMetadata, on q's device
    (int32 or int64); block_tables (S, nb). The cache as for paged_decode_attention.
    max_query_len (host int, >= every chunk's length) sizes the grid.
    """
    check_device(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 query_start_loc=query_start_loc, seq_lens=seq_lens, key_scale=key_scale,
                 value_scale=value_scale, out=out)
    quant = check_queries_against_cache(q, key_cache, value_cache, key_scale, value_scale)
    T, nh, hd = q.shape
    nkv, block_size = key_cache.shape[2], key_cache.shape[1]
    check_tensor("seq_lens", seq_lens, (None,), INDEX_DTYPES)
    S = seq_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, (S + 1,), INDEX_DTYPES)
    check_tensor("block_tables", block_tables, (S, None), INDEX_DTYPES)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, (T, nh, hd), (q.dtype,))
    if not isinstance(max_query_len, int) or max_query_len < 0 or max_query_len > T:
        raise ValueError(f"max_query_len must be an int in [0, {T}], got {max_query_len!r}")
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        # tl.dot needs tiles of at least 16 on GPUs.
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if S == 0 or T == 0 or max_query_len == 0:
        return out

    scale_strides = key_scale.stride()[:2] if quant else (0, 0)
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584,
    # "not supported yet"), so interpreted bf16 runs its dots in fp32. Compiled kernels
    # keep bf16 tensor-core dots.
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    grid = (S, nh, triton.cdiv(max_query_len, block_m))
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, key_scale, value_scale, block_tables, query_start_loc,
        seq_lens, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_size,
        GROUP=nh // nkv, HD=hd, HD_P2=next_pow2(hd, at_least=16), BLOCK_M=block_m,
        BLOCK_N=block_n, QUANT=quant, DOT_F32=dot_f32,
        # fp32 dots get fp32 accuracy: no TF32 rounding of q and k.
        DOT_PRECISION="ieee" if dot_f32 else "tf32",
    )
    return out
