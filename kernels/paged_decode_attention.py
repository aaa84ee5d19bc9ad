"""Decode attention over a paged KV cache: one query token per sequence.

Grid (sequence, KV head, partition). A program takes every query head of one GQA
group (they share the KV head, so K/V are read once for the group) and one
partition of the context: PARTITION_SIZE tokens, walked BLOCK_N at a time with an
online softmax. Long contexts thus spread over many programs (flash-decoding /
split-K) instead of one program walking 32k tokens; the partitions are combined by
merge_attention_partitions. When one partition covers the longest context, the
kernel normalizes and writes the output itself and no merge runs.

The group is small (1-8 heads), below tl.dot's 16-row minimum, so scores are a
broadcast multiply and a sum; decode is bound by reading the cache anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import (INDEX_DTYPES, check_device,
                                      check_queries_against_cache, check_tensor, next_pow2)
from colocate.kernels._paged_tile import LOG2E, load_kv_tile, paged_token_slots
from colocate.kernels.merge_attention_partitions import merge_attention_partitions

DEFAULT_PARTITION_SIZE = 512
DEFAULT_BLOCK_N = 32


@triton.jit
def _paged_decode_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    scale,
    stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
    block_size, num_partitions,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr, QUANT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    s = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + s)
    start = part * PARTITION_SIZE
    end = tl.minimum(start + PARTITION_SIZE, seq_len)

    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, HD_P2)
    g_mask = g < GROUP
    d_mask = d < HD
    heads = kv_head * GROUP + g                                               # (G,)
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)            # (G, HD_P2)
    q = q.to(tl.float32) * (scale * LOG2E)

    m_i = tl.full((GROUP_P2,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_P2,), tl.float32)
    acc = tl.zeros((GROUP_P2, HD_P2), tl.float32)
    table = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        block, offset = paged_token_slots(table, n, valid, block_size)
        k = load_kv_tile(key_cache_ptr, key_scale_ptr, block, offset, valid, kv_head, d, d_mask,
                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)  # (G, N)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # The loop runs only when the partition holds a token, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])                                  # (G, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv_tile(value_cache_ptr, value_scale_ptr, block, offset, valid, kv_head, d,
                         d_mask, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)     # (G, HD_P2)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLIT:
        row = (s * num_heads + heads) * num_partitions + part                # (G,)
        tl.store(part_out_ptr + row[:, None] * HD_P2 + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                           key_scale: torch.Tensor | None = None,
                           value_scale: torch.Tensor | None = None,
                           max_seq_len: int | None = None, out: torch.Tensor | None = None,
                           partition_size: int = DEFAULT_PARTITION_SIZE,
                           block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """q (S, nh, hd), one query per sequence at its last position -> (S, nh, hd).

    key_cache / value_cache (num_blocks, block_size, nkv, hd) in q's dtype, or int8 with
    key_scale / value_scale (num_blocks, block_size, nkv) fp32. block_tables (S, nb)
    and seq_lens (S,) are int32 or int64; sequence i attends to its first seq_lens[i]
    cached tokens. max_seq_len sizes the grid: pass it from the host to spare a device
    sync (it must be >= every seq_len).
    """
    check_device(q=q, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 seq_lens=seq_lens, key_scale=key_scale, value_scale=value_scale, out=out)
    quant = check_queries_against_cache(q, key_cache, value_cache, key_scale, value_scale)
    S, nh, hd = q.shape
    nkv, block_size = key_cache.shape[2], key_cache.shape[1]
    check_tensor("block_tables", block_tables, (S, None), INDEX_DTYPES)
    check_tensor("seq_lens", seq_lens, (S,), INDEX_DTYPES)
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, (S, nh, hd), (q.dtype,))
    if partition_size < block_n or partition_size % block_n or block_n & (block_n - 1):
        raise ValueError(f"partition_size ({partition_size}) must be a multiple of block_n "
                         f"({block_n}), a power of two")
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if S else 0
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds what block_tables holds "
                         f"({block_tables.shape[1]} blocks of {block_size})")
    if S == 0:
        return out

    num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    split = num_partitions > 1
    hd_p2 = next_pow2(hd)
    if split:
        part_out = torch.empty(S, nh, num_partitions, hd_p2, dtype=torch.float32,
                               device=q.device)                              # (S, nh, P, HD_P2)
        part_max = torch.empty(S, nh, num_partitions, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = None
    scale_strides = key_scale.stride()[:2] if quant else (0, 0)
    group = nh // nkv
    _paged_decode_kernel[(S, nkv, num_partitions)](
        q, key_cache, value_cache, key_scale, value_scale, block_tables, seq_lens, out,
        part_out, part_max, part_sum, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_size, num_partitions,
        GROUP=group, GROUP_P2=next_pow2(group), HD=hd, HD_P2=hd_p2, BLOCK_N=block_n,
        PARTITION_SIZE=partition_size, QUANT=quant, SPLIT=split,
    )
    if split:
        merge_attention_partitions(part_out, part_max, part_sum, out)
    return out
