"""Decode attention over a paged KV cache: one query token per sequence.

Grid (sequence, KV head, partition). A program takes every query head of one GQA
group (they share the KV head, so K/V are read once for the group) and one
partition of the context: partition_size tokens, walked BLOCK_N at a time with an
online softmax. Long contexts thus spread over many programs (flash-decoding /
split-K) instead of one program walking 32k tokens; the partitions are combined by
merge_attention_partitions. When one partition covers the longest context, the
kernel normalizes and writes the output itself and no merge runs.

The group's heads are padded to at least 16 rows (MIN_DOT_ROWS) so both products,
QK^T and PV, are tl.dot calls on tensor cores. The broadcast multiply-and-sum this
replaces kept (GROUP, BLOCK_N, HD) fp32 products live: compiled for sm_90 at hd 128
with a GQA group of 8 it used 255 registers and spilled. With an int8 cache QK reads
the key codes as exact fp16/bf16 integers and applies the per-token key scales to the
fp32 scores; values are dequantized in fp32 and rounded once to the dot's dtype, as
the prefill kernel does.

The number of partitions is capped (MAX_PARTITIONS): a longer context gets longer
partitions rather than more of them, which bounds the merge's work and the fp32
scratch per sequence.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import (INDEX_DTYPES, check_device,
                                      check_queries_against_cache, check_tensor,
                                      interpreting, next_pow2)
from colocate.kernels._paged_tile import (LOG2E, load_kv_tile, online_softmax_finish,
                                          online_softmax_start, online_softmax_step,
                                          paged_tile)
from colocate.kernels.merge_attention_partitions import merge_attention_partitions

DEFAULT_PARTITION_SIZE = 512
DEFAULT_BLOCK_N = 32
# Past MAX_PARTITIONS * partition_size tokens, partitions grow instead of multiplying.
MAX_PARTITIONS = 64
# tl.dot's smallest M on tensor cores.
MIN_DOT_ROWS = 16


@triton.jit
def _paged_decode_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    scale,
    stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
    stride_cb, stride_cs, stride_ch, stride_sb, stride_ss,
    block_size, num_partitions, partition_size,
    GROUP: tl.constexpr, GROUP_ROWS: tl.constexpr, HD: tl.constexpr, HD_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, QUANT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + s)
    start = part * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    g = tl.arange(0, GROUP_ROWS)
    d = tl.arange(0, HD_P2)
    g_mask = g < GROUP                       # rows past the group are padding for tl.dot
    d_mask = d < HD
    heads = kv_head * GROUP + g                                               # (G,)
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)            # (G, HD_P2)
    if DOT_F32:
        q = q.to(tl.float32)
    qk_scale = scale * LOG2E

    m_i, l_i, acc = online_softmax_start(GROUP_ROWS, HD_P2)
    table = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n, valid, block, offset = paged_tile(table, n0, end, block_size, BLOCK_N)
        # QUANT=False here: the key codes stay integers (exact in q's dtype) and their
        # per-token scales multiply the fp32 scores below.
        k = load_kv_tile(key_cache_ptr, key_scale_ptr, block, offset, valid, kv_head, d, d_mask,
                         stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, False)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # (G, N)
        if QUANT:
            k_scale = tl.load(key_scale_ptr + block * stride_sb + offset * stride_ss + kv_head,
                              mask=valid, other=0.0)                          # (N,)
            scores = scores * k_scale[None, :]
        scores = tl.where(valid[None, :], scores * qk_scale, float("-inf"))
        # V is dequantized before the dot (unlike K): folding its scales into p instead
        # would push p * scale (often below 1e-5 at long contexts) into fp16 subnormals.
        v = load_kv_tile(value_cache_ptr, value_scale_ptr, block, offset, valid, kv_head, d,
                         d_mask, stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, QUANT)
        # The loop runs only when the partition holds a token, so the max is finite.
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, v.to(q.dtype),
                                            DOT_PRECISION)

    if SPLIT:
        row = (s * num_heads + heads) * num_partitions + part                # (G,)
        tl.store(part_out_ptr + row[:, None] * HD_P2 + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
    else:
        o = online_softmax_finish(acc, l_i)
        tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                           key_scale: torch.Tensor | None = None,
                           value_scale: torch.Tensor | None = None,
                           max_seq_len: int | None = None, out: torch.Tensor | None = None,
                           partition_size: int = DEFAULT_PARTITION_SIZE,
                           block_n: int = DEFAULT_BLOCK_N,
                           max_partitions: int = MAX_PARTITIONS) -> torch.Tensor:
    """q (S, nh, hd), one query per sequence at its last position -> (S, nh, hd).

    key_cache / value_cache (num_blocks, block_size, nkv, hd) in q's dtype, or int8 with
    key_scale / value_scale (num_blocks, block_size, nkv) fp32. block_tables (S, nb)
    and seq_lens (S,) are int32 or int64; sequence i attends to its first seq_lens[i]
    cached tokens. max_seq_len sizes the grid: pass it from the host to spare a device
    sync (it must be >= every seq_len). partition_size is the shortest partition: a
    context over max_partitions of them is split into max_partitions longer ones.
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
    if (partition_size < block_n or partition_size % block_n or block_n & (block_n - 1)
            or block_n < MIN_DOT_ROWS):
        raise ValueError(f"partition_size ({partition_size}) must be a multiple of block_n "
                         f"({block_n}), a power of two >= {MIN_DOT_ROWS}")
    if max_partitions < 1:
        raise ValueError(f"max_partitions must be >= 1, got {max_partitions}")
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if S else 0
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds what block_tables holds "
                         f"({block_tables.shape[1]} blocks of {block_size})")
    if S == 0:
        return out

    partition_size = _partition_size(max_seq_len, partition_size, block_n, max_partitions)
    num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    split = num_partitions > 1
    hd_p2 = next_pow2(hd, at_least=16)            # tl.dot's smallest K and N
    if split:
        part_out = torch.empty(S, nh, num_partitions, hd_p2, dtype=torch.float32,
                               device=q.device)                              # (S, nh, P, HD_P2)
        part_max = torch.empty(S, nh, num_partitions, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = None
    scale_strides = key_scale.stride()[:2] if quant else (0, 0)
    group = nh // nkv
    # fp32 queries (CPU tests, fp32 models) get IEEE fp32 dots, not TF32. The interpreter
    # cannot run bf16 dots (triton-lang/triton#11584), so interpreted bf16 uses fp32 too.
    dot_f32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    _paged_decode_kernel[(S, nkv, num_partitions)](
        q, key_cache, value_cache, key_scale, value_scale, block_tables, seq_lens, out,
        part_out, part_max, part_sum, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides,
        block_size, num_partitions, partition_size,
        GROUP=group, GROUP_ROWS=next_pow2(group, at_least=MIN_DOT_ROWS), HD=hd, HD_P2=hd_p2,
        BLOCK_N=block_n, QUANT=quant, SPLIT=split, DOT_F32=dot_f32,
        DOT_PRECISION="ieee" if dot_f32 else "tf32",
    )
    if split:
        merge_attention_partitions(part_out, part_max, part_sum, out)
    return out


def _partition_size(max_seq_len: int, shortest: int, block_n: int, max_partitions: int) -> int:
    """`shortest`, or the multiple of block_n that splits max_seq_len into at most
    max_partitions partitions, whichever is longer."""
    needed = triton.cdiv(max(1, triton.cdiv(max_seq_len, max_partitions)), block_n) * block_n
    return max(shortest, needed)
