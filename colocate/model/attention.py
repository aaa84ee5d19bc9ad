"""Paged attention on CPU with torch ops.

Two jobs per layer: write the step's new K/V into the paged cache at `slot_mapping`,
then attend each sequence's queries over its whole context read back through its
block table. Everything that depends only on the AttentionMetadata (masks, block-id
slices, the all-decode gather index) is worked out once per forward in `AttentionPlan`
and reused by every layer, so the per-layer cost is the tensor work alone.

CUDA: the Triton kernels in colocate.kernels (reshape-and-cache and paged attention
over block tables) replace `write_kv` and `paged_attention` below; the plan becomes
the kernels' launch arguments. The model calls only these two functions, so the
switch stays inside this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colocate.model.attention_metadata import AttentionMetadata


@dataclass
class _SeqPlan:
    start: int                       # first token of this sequence in the flat batch
    end: int
    context_len: int                 # tokens cached before this step
    seq_len: int                     # context_len + query_len
    block_ids: torch.Tensor | None   # (1, nb) blocks holding the seq_len keys; None: use fresh K/V
    mask: torch.Tensor | None        # (q, seq_len) bool, True = may attend; None: plain causal


@dataclass
class AttentionPlan:
    """What every layer of one forward needs to know about the batch layout."""
    block_size: int
    seqs: list[_SeqPlan]
    # all-decode batched path (None otherwise)
    decode_blocks: torch.Tensor | None = None   # (S, nb) block table trimmed to the longest seq
    decode_len: int = 0                         # keys gathered per sequence (longest seq_len)
    decode_mask: torch.Tensor | None = None     # (S, 1, 1, L) bool; None when all lengths match

    @classmethod
    def build(cls, meta: AttentionMetadata) -> "AttentionPlan":
        bs = meta.block_size
        if meta.all_decode:
            longest = max(meta.seq_lens)
            blocks = meta.block_tables[:, : -(-longest // bs)]     # (S, nb)
            mask = None
            if min(meta.seq_lens) != longest:
                lens = torch.tensor(meta.seq_lens, device=blocks.device)
                keys = torch.arange(longest, device=blocks.device)
                mask = (keys[None, :] < lens[:, None])[:, None, None, :]  # (S, 1, 1, L)
            return cls(bs, [], decode_blocks=blocks, decode_len=longest, decode_mask=mask)

        seqs = []
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            seq_len, ctx = meta.seq_lens[i], meta.context_len(i)
            if ctx == 0:
                # A fresh prefill attends only to its own new keys: take them straight from
                # the projection instead of reading them back out of the cache.
                seqs.append(_SeqPlan(start, end, 0, seq_len, None, None))
                continue
            block_ids = meta.block_tables[i:i + 1, : -(-seq_len // bs)]
            # Query j sits at position ctx + j and sees keys 0 .. ctx + j.
            mask = torch.ones(end - start, seq_len, dtype=torch.bool,
                              device=block_ids.device).tril(diagonal=ctx)
            seqs.append(_SeqPlan(start, end, ctx, seq_len, block_ids, mask))
        return cls(bs, seqs)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the step's key / value (T, nkv, hd) at their slots of the paged cache."""
    nkv, hd = key.shape[1], key.shape[2]
    key_cache.view(-1, nkv, hd).index_copy_(0, slot_mapping, key)       # (blocks*bs, nkv, hd)
    value_cache.view(-1, nkv, hd).index_copy_(0, slot_mapping, value)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                    value_cache: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """q (T, nh, hd), this step's k / v (T, nkv, hd) -> attention output (T, nh * hd).

    The new K/V must already be in the cache (write_kv): sequences with cached context
    read all their keys from it.
    """
    if plan.decode_blocks is not None:
        return _decode_attention(q, key_cache, value_cache, plan, scale)
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for s in plan.seqs:
        if s.block_ids is None:
            ks, vs = k[s.start:s.end], v[s.start:s.end]                   # (q, nkv, hd)
        else:
            ks = _gather(key_cache, s.block_ids, s.seq_len)[0]            # (L, nkv, hd)
            vs = _gather(value_cache, s.block_ids, s.seq_len)[0]
        o = F.scaled_dot_product_attention(
            q[s.start:s.end].transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
            attn_mask=s.mask, is_causal=s.mask is None, scale=scale, enable_gqa=True,
        )                                                                 # (nh, q, hd)
        out[s.start:s.end] = o.transpose(0, 1).reshape(s.end - s.start, -1)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of every sequence, (S, length, nkv, hd).

    index_select over the flattened table, not cache[block_tables]: advanced indexing
    is about 3x slower here, and this runs twice per layer per step.
    """
    S = block_tables.shape[0]
    blocks = cache.index_select(0, block_tables.flatten())                # (S * nb, bs, nkv, hd)
    return blocks.view(S, -1, cache.shape[2], cache.shape[3])[:, :length]


def _decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      plan: AttentionPlan, scale: float) -> torch.Tensor:
    """One query per sequence: gather every sequence's blocks at once, pad, mask, one SDPA."""
    S, nh, hd = q.shape
    L = plan.decode_len
    ks = _gather(key_cache, plan.decode_blocks, L)                        # (S, L, nkv, hd)
    vs = _gather(value_cache, plan.decode_blocks, L)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),          # (S, nh, 1, hd), (S, nkv, L, hd)
        attn_mask=plan.decode_mask, scale=scale, enable_gqa=True,
    )                                                                     # (S, nh, 1, hd)
    return o.reshape(S, nh * hd)
