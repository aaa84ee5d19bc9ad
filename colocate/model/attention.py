"""Paged attention for one layer: write the step's K/V into the cache, then attend.

Two jobs per layer: write the step's new K/V into the paged cache at `slot_mapping`,
then attend each sequence's queries over its whole context read back through its
block table. Everything that depends only on the AttentionMetadata (masks, block-id
slices, the all-decode gather index, the kernels' launch tensors) is worked out once
per forward in `AttentionPlan` and reused by every layer, so the per-layer cost is the
tensor work alone.

`attend` is the one place that picks the implementation: CUDA tensors go to the Triton
kernels in colocate.kernels, CPU tensors to the torch ops below. Setting
COLOCATE_ATTENTION_BACKEND=triton sends CPU tensors to the kernels too, which with
TRITON_INTERPRET=1 is how the kernel path is tested on a machine without a GPU.

With an int8 cache, attention always sees the cached (quantized) K/V, fresh prefill
included, so a prompt's logits hardly depend on how it was chunked or prefix-cached
(only where float noise tips a value across a rounding boundary of its int8 code).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.kv_cache import LayerKVCache, dequantize_kv, quantize_kv

ATTENTION_BACKEND_ENV = "COLOCATE_ATTENTION_BACKEND"


def use_kernels(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get(ATTENTION_BACKEND_ENV) == "triton"


@dataclass
class _SeqPlan:
    start: int                       # first token of this sequence in the flat batch
    end: int
    context_len: int                 # tokens cached before this step
    seq_len: int                     # context_len + query_len
    block_ids: torch.Tensor | None   # (1, nb) blocks holding the seq_len keys; None: use fresh K/V
    mask: torch.Tensor | None        # (q, seq_len) bool, True = may attend; None: plain causal


@dataclass
class KernelArgs:
    """Launch tensors for the Triton kernels, on the cache's device."""
    block_tables: torch.Tensor       # (S, max_blocks) int64
    seq_lens: torch.Tensor           # (S,) int32
    query_start_loc: torch.Tensor    # (S + 1,) int32
    max_query_len: int              # host ints size the grids without a device sync
    max_seq_len: int
    all_decode: bool


@dataclass
class AttentionPlan:
    """What every layer of one forward needs to know about the batch layout."""
    block_size: int
    seqs: list[_SeqPlan]
    # all-decode batched path (None otherwise)
    decode_blocks: torch.Tensor | None = None   # (S, nb) block table trimmed to the longest seq
    decode_len: int = 0                         # keys gathered per sequence (longest seq_len)
    decode_mask: torch.Tensor | None = None     # (S, 1, 1, L) bool; None when all lengths match
    kernels: KernelArgs | None = None           # set when the Triton kernels run attention

    @classmethod
    def build(cls, meta: AttentionMetadata) -> "AttentionPlan":
        bs = meta.block_size
        device = meta.block_tables.device
        if use_kernels(device):
            qsl = meta.query_start_loc
            args = KernelArgs(
                block_tables=meta.block_tables,
                seq_lens=torch.tensor(meta.seq_lens, dtype=torch.int32, device=device),
                query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
                max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
                max_seq_len=max(meta.seq_lens), all_decode=meta.all_decode)
            return cls(bs, [], kernels=args)

        if meta.all_decode:
            longest = max(meta.seq_lens)
            blocks = meta.block_tables[:, : -(-longest // bs)]     # (S, nb)
            mask = None
            if min(meta.seq_lens) != longest:
                lens = torch.tensor(meta.seq_lens, device=device)
                keys = torch.arange(longest, device=device)
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
                              device=device).tril(diagonal=ctx)
            seqs.append(_SeqPlan(start, end, ctx, seq_len, block_ids, mask))
        return cls(bs, seqs)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
           plan: AttentionPlan, slot_mapping: torch.Tensor, scale: float,
           prefill_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q (T, nh, hd), this step's k / v (T, nkv, hd) -> attention output (T, nh * hd).

    Stores k / v at `slot_mapping` first: sequences with cached context read all their
    keys back from the cache. `prefill_dtype`: what the torch path's prefill products
    compute in, when not q's dtype (a CPU with bf16 units, see LlamaAttention).
    """
    if plan.kernels is not None:
        return _kernel_attend(q, k, v, cache, plan.kernels, slot_mapping, scale)
    k, v = write_kv(k, v, cache, slot_mapping)
    return paged_attention(q, k, v, cache, plan, scale, prefill_dtype)


def _kernel_attend(q, k, v, cache: LayerKVCache, args: KernelArgs, slot_mapping, scale):
    # Imported here, not at the top: the CPU path never needs triton, and triton decides
    # at kernel-definition time whether to interpret (tests set TRITON_INTERPRET first).
    from colocate import kernels

    kernels.reshape_and_cache(k, v, cache.key, cache.value, slot_mapping,
                              cache.key_scale, cache.value_scale)
    if args.all_decode:
        o = kernels.paged_decode_attention(
            q, cache.key, cache.value, args.block_tables, args.seq_lens, scale,
            key_scale=cache.key_scale, value_scale=cache.value_scale,
            max_seq_len=args.max_seq_len)                                     # (T, nh, hd)
    else:
        o = kernels.paged_prefill_attention(
            q, cache.key, cache.value, args.block_tables, args.query_start_loc,
            args.seq_lens, args.max_query_len, scale,
            key_scale=cache.key_scale, value_scale=cache.value_scale)        # (T, nh, hd)
    return o.view(q.shape[0], -1)


def write_kv(key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
             slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the step's key / value (T, nkv, hd) at their slots of the paged cache.

    Returns the key / value as attention must see them: the inputs themselves, or
    with an int8 cache their dequantized copies (what a later step will read back).
    """
    nkv, hd = key.shape[1], key.shape[2]
    if not cache.quantized:
        cache.key.view(-1, nkv, hd).index_copy_(0, slot_mapping, key)      # (blocks*bs, nkv, hd)
        cache.value.view(-1, nkv, hd).index_copy_(0, slot_mapping, value)
        return key, value
    seen = []
    for x, codes, scales in ((key, cache.key, cache.key_scale),
                             (value, cache.value, cache.value_scale)):
        q, s = quantize_kv(x)                                             # (T, nkv, hd), (T, nkv)
        codes.view(-1, nkv, hd).index_copy_(0, slot_mapping, q)
        scales.view(-1, nkv).index_copy_(0, slot_mapping, s)
        seen.append(dequantize_kv(q, s, x.dtype))
    return seen[0], seen[1]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKVCache,
                    plan: AttentionPlan, scale: float,
                    prefill_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Torch ops: q (T, nh, hd), this step's k / v (T, nkv, hd) -> (T, nh * hd).

    The new K/V must already be in the cache (write_kv); prefills compute in
    `prefill_dtype` (default: q's) and return q's dtype.
    """
    if plan.decode_blocks is not None:
        return _decode_attention(q, cache, plan, scale)
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype, device=q.device)
    for s in plan.seqs:
        if s.block_ids is None:
            ks, vs = k[s.start:s.end], v[s.start:s.end]                   # (q, nkv, hd)
        else:
            ks, vs = _gather_kv(cache, s.block_ids, s.seq_len, q.dtype)
            ks, vs = ks[0], vs[0]                                         # (L, nkv, hd)
        # 4-D (a batch of one), not 3-D: torch's CPU flash kernel takes only 4-D inputs
        # and 3-D ones fall to the math path (measured on the Zen 3: 440 against 204 ms
        # of a 512-token fp32 prefill's attention).
        dtype = prefill_dtype or q.dtype
        o = F.scaled_dot_product_attention(
            q[s.start:s.end].transpose(0, 1)[None].to(dtype), ks.transpose(0, 1)[None].to(dtype),
            vs.transpose(0, 1)[None].to(dtype), attn_mask=s.mask, is_causal=s.mask is None,
            scale=scale, enable_gqa=True,
        )[0]                                                              # (nh, q, hd)
        out[s.start:s.end] = o.transpose(0, 1).reshape(s.end - s.start, -1)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of every sequence, (S, length, ...).

    index_select over the flattened table, not cache[block_tables]: advanced indexing
    is about 3x slower here, and this runs twice per layer per step.
    """
    S = block_tables.shape[0]
    blocks = cache.index_select(0, block_tables.flatten())                # (S * nb, bs, ...)
    return blocks.view(S, -1, *cache.shape[2:])[:, :length]


def _gather_kv(cache: LayerKVCache, block_tables: torch.Tensor, length: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (S, length, nkv, hd) in `dtype`, dequantized from an int8 cache."""
    ks = _gather(cache.key, block_tables, length)                         # (S, L, nkv, hd)
    vs = _gather(cache.value, block_tables, length)
    if cache.quantized:
        ks = dequantize_kv(ks, _gather(cache.key_scale, block_tables, length), dtype)
        vs = dequantize_kv(vs, _gather(cache.value_scale, block_tables, length), dtype)
    return ks, vs


def _decode_attention(q: torch.Tensor, cache: LayerKVCache, plan: AttentionPlan,
                      scale: float) -> torch.Tensor:
    """One query per sequence: gather every sequence's blocks at once, pad, mask, one SDPA."""
    S, nh, hd = q.shape
    ks, vs = _gather_kv(cache, plan.decode_blocks, plan.decode_len, q.dtype)  # (S, L, nkv, hd)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2), ks.transpose(1, 2), vs.transpose(1, 2),          # (S, nh, 1, hd), (S, nkv, L, hd)
        attn_mask=plan.decode_mask, scale=scale, enable_gqa=True,
    )                                                                     # (S, nh, 1, hd)
    return o.reshape(S, nh * hd)
