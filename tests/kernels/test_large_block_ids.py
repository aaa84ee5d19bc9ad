"""Block ids whose element offset passes 2**31: the kernels must index in int64.

The cache is real but mostly unbacked: torch.empty of a few GiB only reserves
address space, and Linux backs a page when it is first touched. The test writes and
reads a handful of blocks at the end, so it costs a few MiB of memory. (The
interpreter passes CPU tensors to the kernel as they are, without copying them.)
"""
from __future__ import annotations

import pytest
import torch

from colocate.kernels import reshape_and_cache
from tests.kernels.reference import make_batch, reference_attention
from tests.kernels.test_paged_attention import SCALE, run_decode, run_prefill

NKV, HD, BS = 1, 16, 8
TOKEN_ELEMS = NKV * HD
# Enough blocks that the last ones start past element 2**31 (2 GiB of int8, 4 GiB of
# fp16 address space).
NUM_BLOCKS = 2**31 // (BS * TOKEN_ELEMS) + 64


def _huge_cache(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    shape = (NUM_BLOCKS, BS, NKV, HD)
    cache = (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
    if dtype == torch.int8:
        cache += (torch.empty(shape[:3]), torch.empty(shape[:3]))
    return cache


@pytest.fixture(scope="module", params=[torch.int8, torch.float16], ids=["int8", "fp16"])
def huge(request):
    return request.param, _huge_cache(request.param)


def test_offsets_pass_int32(huge):
    dtype, cache = huge
    assert (NUM_BLOCKS - 1) * cache[0].stride(0) > 2**31


def _batch(dtype, cache, query_lens):
    # Sequences over the last blocks, plus block 1 so low and high ids mix in one table.
    ids = [NUM_BLOCKS - 1, 1, NUM_BLOCKS - 7, NUM_BLOCKS - 3, NUM_BLOCKS - 2]
    q_dtype = torch.float32 if dtype == torch.int8 else dtype
    return make_batch([19, 12], query_lens, 2, NKV, HD, BS, q_dtype, dtype == torch.int8,
                      cache=cache, block_ids=ids)


def test_decode_and_prefill_read_huge_blocks(huge):
    dtype, cache = huge
    atol = 2e-5 if dtype == torch.int8 else 2e-3
    decode = _batch(dtype, cache, [1, 1])
    torch.testing.assert_close(run_decode(decode, partition_size=16, block_n=16).float(),
                               reference_attention(decode, SCALE), atol=atol, rtol=atol)
    prefill = _batch(dtype, cache, [19, 5])
    torch.testing.assert_close(run_prefill(prefill).float(), reference_attention(prefill, SCALE),
                               atol=atol, rtol=atol)


def test_reshape_and_cache_writes_huge_blocks(huge):
    dtype, cache = huge
    scales = cache[2:] if dtype == torch.int8 else (None, None)
    x = torch.randn(2, NKV, HD).to(torch.float32 if dtype == torch.int8 else dtype)
    slots = torch.tensor([(NUM_BLOCKS - 1) * BS + 5, (NUM_BLOCKS - 5) * BS])
    reshape_and_cache(x, -x, cache[0], cache[1], slots, *scales)
    stored = cache[1].view(-1, NKV, HD)[slots].float()
    if dtype == torch.int8:
        stored = stored * cache[3].view(-1, NKV)[slots].unsqueeze(-1)
    torch.testing.assert_close(stored, -x.float(), atol=0.02, rtol=0.02)
