"""reshape_and_cache against index_copy_ and quantize_kv."""
from __future__ import annotations

import pytest
import torch

from colocate.kernels import reshape_and_cache
from colocate.model.kv_cache import allocate_kv_caches, quantize_kv


def _write(key, value, cache, slots):
    reshape_and_cache(key, value, cache.key, cache.value, slots, cache.key_scale,
                      cache.value_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("nkv,hd", [(1, 16), (2, 16), (3, 24)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_writes_each_token_at_its_slot(dtype, nkv, hd, block_size):
    gen = torch.Generator().manual_seed(nkv * hd + block_size)
    in_dtype = torch.float32 if dtype == torch.int8 else dtype
    cache = allocate_kv_caches(1, 6, block_size, nkv, hd, dtype)[0]
    T = 7
    key = torch.randn(T, nkv, hd, generator=gen).to(in_dtype)
    value = torch.randn(T, nkv, hd, generator=gen).to(in_dtype)
    key[2] = 0                                             # an all-zero token: scale 0, no NaN
    slots = torch.randperm(6 * block_size, generator=gen)[:T]
    _write(key, value, cache, slots)

    for x, codes, scales in ((key, cache.key, cache.key_scale),
                             (value, cache.value, cache.value_scale)):
        stored = codes.view(-1, nkv, hd)                    # (slots, nkv, hd)
        if dtype == torch.int8:
            want_codes, want_scales = quantize_kv(x)
            assert torch.equal(stored[slots], want_codes)
            assert torch.equal(scales.view(-1, nkv)[slots], want_scales)
        else:
            assert torch.equal(stored[slots], x)
        untouched = torch.ones(stored.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert not stored[untouched].any()


def test_negative_slots_write_nothing_and_views_are_accepted():
    cache = allocate_kv_caches(1, 3, 8, 2, 16, torch.float32)[0]
    qkv = torch.randn(4, 5, 16)                            # like the fused projection
    key, value = qkv[:, 1:3], qkv[:, 3:5]                  # (4, 2, 16) views, row stride 80
    _write(key, value, cache, torch.tensor([8, -1, 23, -1]))
    flat = cache.key.view(-1, 2, 16)
    assert torch.equal(flat[8], key[0]) and torch.equal(flat[23], key[2])
    assert torch.count_nonzero(flat.abs().sum((1, 2))) == 2
    assert torch.equal(cache.value.view(-1, 2, 16)[23], value[2])
