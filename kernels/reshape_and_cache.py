"""Write a step's keys and values into the paged KV cache by slot, quantizing to int8
when the cache is int8.

One program per token moves all of its KV heads: a (nkv, hd) tile for the key and one
for the value. A slot is block_id * block_size + offset; a negative slot means "no
slot" (a padded token) and writes nothing. Quantization follows
colocate.model.kv_cache.quantize_kv exactly: scale = max|x| / 127 per head,
code = floor(x * 127 / max|x| + 0.5).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import (FLOAT_DTYPES, INDEX_DTYPES, check_device, check_kv_cache,
                                      check_tensor, next_pow2)


# Floor under max|x| in 127 / max|x|: keeps the unused branch of an all-zero head
# finite. The same constant as colocate.model.kv_cache.quantize_kv.
AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-30)


@triton.jit
def _store_head_tile(x, cache_ptr, scale_ptr, cache_off, scale_off, mask, head_mask,
                     QUANT: tl.constexpr):
    """Store a (nkv, hd) tile at cache_off, as int8 codes plus per-head scales if QUANT."""
    if QUANT:
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=1)                                   # (nkv,)
        # div_rn, not `/`: fp32 `/` compiles to an approximate division on NVIDIA GPUs,
        # and one ulp off in inv moves a code across its rounding boundary, so the
        # codes would no longer equal quantize_kv's (IEEE) ones.
        inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, AMAX_FLOOR)),
                       0.0)
        codes = tl.floor(xf * inv[:, None] + 0.5)
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        tl.store(cache_ptr + cache_off, codes.to(tl.int8), mask=mask)
        tl.store(scale_ptr + scale_off, tl.math.div_rn(amax, 127.0), mask=head_mask)
    else:
        tl.store(cache_ptr + cache_off, x.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr,
    slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,      # key / value (T, nkv, hd), hd stride 1
    stride_cb, stride_cs, stride_ch,                 # cache (blocks, bs, nkv, hd), hd stride 1
    stride_sb, stride_ss,                            # scales (blocks, bs, nkv), nkv stride 1
    block_size,
    NKV: tl.constexpr, HD: tl.constexpr, NKV_P2: tl.constexpr, HD_P2: tl.constexpr,
    QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    # int64 from here on: block * stride_cb overflows int32 for large caches.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, NKV_P2)
    d = tl.arange(0, HD_P2)
    # (h + slot * 0 >= 0) rather than a scalar (slot >= 0): the interpreter rejects
    # masks built from a tensor & a scalar bool.
    head_mask = (h < NKV) & (h * 0 + slot >= 0)
    mask = head_mask[:, None] & (d[None, :] < HD)                           # (nkv, hd)

    # other=0: a masked lane is undefined on a GPU (only the interpreter zero-fills), and
    # the int8 path takes max|x| over the whole padded row, head dims past HD included.
    k = tl.load(key_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask,
                other=0.0)                                                  # (NKV_P2, HD_P2)
    v = tl.load(value_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask,
                other=0.0)
    cache_off = block * stride_cb + offset * stride_cs + h[:, None] * stride_ch + d[None, :]
    scale_off = block * stride_sb + offset * stride_ss + h
    _store_head_tile(k, key_cache_ptr, key_scale_ptr, cache_off, scale_off, mask, head_mask,
                     QUANT)
    _store_head_tile(v, value_cache_ptr, value_scale_ptr, cache_off, scale_off, mask, head_mask,
                     QUANT)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      key_scale: torch.Tensor | None = None,
                      value_scale: torch.Tensor | None = None) -> None:
    """key, value (T, nkv, hd) -> key_cache / value_cache (num_blocks, block_size, nkv, hd)
    at `slot_mapping` (T,). With an int8 cache, also writes key_scale / value_scale
    (num_blocks, block_size, nkv) fp32. Slots must lie inside the cache (not checked:
    that would cost a device sync); negative slots are skipped."""
    check_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache,
                 slot_mapping=slot_mapping, key_scale=key_scale, value_scale=value_scale)
    check_tensor("key", key, (None, None, None), FLOAT_DTYPES)
    T, nkv, hd = key.shape
    check_tensor("value", value, (T, nkv, hd), (key.dtype,))
    check_tensor("slot_mapping", slot_mapping, (T,), INDEX_DTYPES)
    quant = check_kv_cache(key_cache, value_cache, key_scale, value_scale, nkv, hd)
    if not quant and key_cache.dtype != key.dtype:
        raise ValueError(f"key_cache dtype {key_cache.dtype} must equal key dtype {key.dtype} "
                         "(or be int8)")
    if T == 0:
        return
    scale_strides = key_scale.stride()[:2] if quant else (0, 0)
    _reshape_and_cache_kernel[(T,)](
        key, value, key_cache, value_cache, key_scale, value_scale, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        *scale_strides, key_cache.shape[1],
        NKV=nkv, HD=hd, NKV_P2=next_pow2(nkv), HD_P2=next_pow2(hd), QUANT=quant,
    )
