"""A plain torch reference for the paged attention kernels, and random paged batches.

The reference reads the cache token by token through the block table (no blocks, no
online softmax, fp32 throughout), so it shares no structure with the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.model.kv_cache import quantize_kv


@dataclass
class PagedBatch:
    q: torch.Tensor                  # (T, nh, hd)
    key_cache: torch.Tensor          # (num_blocks, block_size, nkv, hd)
    value_cache: torch.Tensor
    key_scale: torch.Tensor | None   # (num_blocks, block_size, nkv) fp32, int8 caches only
    value_scale: torch.Tensor | None
    block_tables: torch.Tensor       # (S, max_blocks) int64, padded with block 0
    query_start_loc: list[int]
    seq_lens: list[int]

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[1]

    def slots(self, i: int, positions: torch.Tensor) -> torch.Tensor:
        """Slots of sequence i's tokens at `positions`."""
        bs = self.block_size
        return self.block_tables[i, positions // bs] * bs + positions % bs


def make_batch(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
               head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
               kv_int8: bool = False, seed: int = 0, extra_blocks: int = 3,
               cache: tuple[torch.Tensor, ...] | None = None,
               block_ids: list[int] | None = None) -> PagedBatch:
    """Random queries and a random cache holding every sequence's seq_len tokens in
    shuffled blocks. `cache` (key, value[, key_scale, value_scale]) and `block_ids`
    (the blocks to hand out, in order) override the defaults: the huge-block tests
    pass a mostly unbacked cache and block ids near its end."""
    gen = torch.Generator().manual_seed(seed)
    S = len(seq_lens)
    per_seq = [-(-n // block_size) for n in seq_lens]
    max_blocks = max(per_seq + [1])
    if block_ids is None:
        num_blocks = sum(per_seq) + extra_blocks + 1
        block_ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    if cache is None:
        shape = (len(block_ids) + extra_blocks + 1, block_size, num_kv_heads, head_dim)
        cache = tuple(torch.zeros(shape, dtype=torch.int8 if kv_int8 else dtype) for _ in "kv")
        if kv_int8:
            cache += tuple(torch.zeros(shape[:3]) for _ in "kv")
    key_cache, value_cache = cache[0], cache[1]
    key_scale, value_scale = (cache[2], cache[3]) if kv_int8 else (None, None)

    tables = torch.zeros(S, max_blocks, dtype=torch.long)
    it = iter(block_ids)
    for i, nb in enumerate(per_seq):
        tables[i, :nb] = torch.tensor([next(it) for _ in range(nb)], dtype=torch.long)
    batch = PagedBatch(q=None, key_cache=key_cache, value_cache=value_cache,
                       key_scale=key_scale, value_scale=value_scale, block_tables=tables,
                       query_start_loc=[0], seq_lens=list(seq_lens))
    for i, n in enumerate(seq_lens):
        slots = batch.slots(i, torch.arange(n))
        for codes, scales in ((key_cache, key_scale), (value_cache, value_scale)):
            x = torch.randn(n, num_kv_heads, head_dim, generator=gen)    # (n, nkv, hd)
            if kv_int8:
                qx, sx = quantize_kv(x)
                codes.view(-1, num_kv_heads, head_dim)[slots] = qx
                scales.view(-1, num_kv_heads)[slots] = sx
            else:
                codes.view(-1, num_kv_heads, head_dim)[slots] = x.to(dtype)
    for ql in query_lens:
        batch.query_start_loc.append(batch.query_start_loc[-1] + ql)
    T = batch.query_start_loc[-1]
    batch.q = torch.randn(T, num_heads, head_dim, generator=gen).to(dtype)
    return batch


def cached_kv(batch: PagedBatch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence i's cached keys and values (seq_len, nkv, hd), fp32, dequantized."""
    nkv, hd = batch.key_cache.shape[2:]
    slots = batch.slots(i, torch.arange(batch.seq_lens[i]))
    out = []
    for codes, scales in ((batch.key_cache, batch.key_scale),
                          (batch.value_cache, batch.value_scale)):
        x = codes.view(-1, nkv, hd)[slots].float()
        if scales is not None:
            x = x * scales.view(-1, nkv)[slots].unsqueeze(-1)
        out.append(x)
    return out[0], out[1]


def reference_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """(T, nh, hd) fp32: each query at position context_len + j attends causally to
    its sequence's cached keys 0 .. context_len + j."""
    T, nh, hd = batch.q.shape
    out = torch.zeros(T, nh, hd)
    for i, seq_len in enumerate(batch.seq_lens):
        a, b = batch.query_start_loc[i], batch.query_start_loc[i + 1]
        if a == b:
            continue
        k, v = cached_kv(batch, i)
        group = nh // k.shape[1]
        k = k.repeat_interleave(group, dim=1)                              # (L, nh, hd)
        v = v.repeat_interleave(group, dim=1)
        q = batch.q[a:b].float()                                           # (q, nh, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale                # (nh, q, L)
        q_pos = torch.arange(seq_len - (b - a), seq_len)
        visible = torch.arange(seq_len)[None, :] <= q_pos[:, None]         # (q, L)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
