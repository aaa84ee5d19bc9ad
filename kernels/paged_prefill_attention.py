"""Causal attention for a flat batch of query chunks over a paged KV cache.

Sequence i's queries are rows query_start_loc[i] : query_start_loc[i + 1] of the flat
batch and sit at positions context_len .. seq_len - 1, where context_len = seq_len -
query_len tokens were cached by earlier steps (a chunked or prefix-cached prefill; a
fresh prefill has context_len 0). The step's own K/V must already be in the cache
(reshape_and_cache), so every key, old or new, is read through the block table.

Grid (query block, KV head). A program takes BLOCK_Q consecutive queries of one
sequence and every query head of one GQA group: its BLOCK_M = BLOCK_Q * GROUP_P2 rows
are (query, head) pairs, so K/V are read once per group rather than once per query
head. It walks keys 0 .. (its last query's position) BLOCK_N at a time with an online
softmax; the causal mask only bites in the last tiles.

The query blocks of all sequences are numbered in one flat range: sequence i's start
at query_start_loc[i] // BLOCK_Q + i, which leaves each sequence at least the
cdiv(query_len, BLOCK_Q) blocks it needs, and T // BLOCK_Q + S blocks cover the batch
(computable on the host without a device sync). A program finds its sequence by
binary search. A sequence costs its own blocks plus at most one empty program, so in a
mixed batch (one long chunk, many decodes: a decode is a chunk of one query) the
decodes no longer get as many programs as the longest chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import (INDEX_DTYPES, check_device, check_queries_against_cache,
                                      check_tensor, interpreting, next_pow2)
from colocate.kernels._paged_tile import (LOG2E, load_kv_tile, online_softmax_finish,
                                          online_softmax_start, online_softmax_step,
                                          paged_tile)

DEFAULT_BLOCK_M = 16
DEFAULT_BLOCK_N = 16


@triton.jit
def _paged_prefill_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
    block_size,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    # The sequence whose query blocks hold pid: the last i with first_block(i) <= pid.
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid)
    s = lo
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    context_len = seq_len - q_len
    q_block = pid - (q_start // BLOCK_Q + s)          # this program's block of the sequence

    r = tl.arange(0, BLOCK_M)
    qi = q_block * BLOCK_Q + r // GROUP_P2                                    # (M,) query
    g = r % GROUP_P2                                                          # (M,) head in group
    d = tl.arange(0, HD_P2)
    row_mask = (qi < q_len) & (g < GROUP)
    d_mask = d < HD
    rows = (q_start + qi).to(tl.int64)                                        # (M,) flat rows
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)          # (M, HD_P2)
    if DOT_F32:
        q = q.to(tl.float32)    # both dots follow q's dtype
    q_pos = context_len + qi                                                  # (M,)
    qk_scale = scale * LOG2E

    # Keys this block of queries can see end at its last query's position; a block
    # past the end of the chunk has nothing to do.
    hi_key = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    hi_key = tl.where(q_block * BLOCK_Q < q_len, hi_key, 0)

    m_i, l_i, acc = online_softmax_start(BLOCK_M, HD_P2)
    table = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(0, hi_key, BLOCK_N):
        n, valid, block, offset = paged_tile(table, n0, hi_key, block_size, BLOCK_N)
        k = load_kv_tile(key_cache_ptr, key_scale_ptr, block, offset, valid, kv_head, d, d_mask,
                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # (M, N)
        scores = scores * qk_scale
        visible = valid[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        # Key 0 is in the first tile and every row sees it (q_pos >= 0, padding rows
        # included), so after that tile m_i is finite for every row and a fully masked
        # later tile adds exp2(-inf) = 0.
        v = load_kv_tile(value_cache_ptr, value_scale_ptr, block, offset, valid, kv_head, d,
                         d_mask, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, v.to(q.dtype),
                                            DOT_PRECISION)

    o = online_softmax_finish(acc, l_i)
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
    max_query_len (host int, >= every chunk's length): 0 skips the launch. block_m is
    the rows per program, (query, head) pairs: block_m // GROUP_P2 queries (at least
    one) of every head of a GQA group.
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
    group = nh // nkv
    group_p2 = next_pow2(group)
    block_q = max(1, block_m // group_p2)
    grid = (T // block_q + S, nkv)          # enough for every sequence's blocks (see top)
    _paged_prefill_kernel[grid](
        q, key_cache, value_cache, key_scale, value_scale, block_tables, query_start_loc,
        seq_lens, out, scale, S,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_size,
        GROUP=group, GROUP_P2=group_p2, HD=hd, HD_P2=next_pow2(hd, at_least=16),
        BLOCK_Q=block_q, BLOCK_N=block_n, QUANT=quant, DOT_F32=dot_f32,
        # fp32 dots get fp32 accuracy: no TF32 rounding of q and k.
        DOT_PRECISION="ieee" if dot_f32 else "tf32",
    )
    return out
