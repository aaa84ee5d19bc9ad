"""KVCacheMemory: one region per pool, laid out without overlap, and given back to the
machine on release (measured as this process's resident memory)."""
from __future__ import annotations

import psutil
import pytest
import torch

from colocate.model.kv_memory import KVCacheMemory

MiB = 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_every_view_has_its_shape_and_its_own_bytes(dtype):
    mem = KVCacheMemory(3, 5, 4, 2, 8, dtype)
    tensors = [t for c in mem.caches for t in (c.key, c.value, c.key_scale, c.value_scale)
               if t is not None]
    assert len(tensors) == 3 * (4 if dtype == torch.int8 else 2)
    for c in mem.caches:
        assert c.key.shape == c.value.shape == (5, 4, 2, 8) and c.key.dtype == dtype
        assert c.quantized == (dtype == torch.int8)
        if c.quantized:
            assert c.key_scale.shape == (5, 4, 2) and c.key_scale.dtype == torch.float32
    assert all(bool((t == 0).all()) for t in tensors)          # zeroed
    for i, t in enumerate(tensors):                            # no two views overlap
        t.fill_(i + 1)
    assert [int(t.flatten()[0].item()) for t in tensors] == list(range(1, len(tensors) + 1))
    assert all(bool((t == i + 1).all()) for i, t in enumerate(tensors))


def test_release_returns_the_pages_and_allocate_gives_a_zeroed_pool():
    process = psutil.Process()
    mem = KVCacheMemory(4, 4097, 16, 4, 32, torch.float32)      # 128 MiB and a block
    assert mem.nbytes >= 128 * MiB
    mem.caches[0].key.fill_(3.0)
    held = process.memory_info().rss
    mem.release()
    freed = held - process.memory_info().rss
    assert freed > 0.95 * mem.nbytes, (freed / MiB, mem.nbytes / MiB)
    assert not mem.allocated
    with pytest.raises(RuntimeError, match="released"):
        mem.caches
    mem.allocate()
    assert process.memory_info().rss - (held - freed) > 0.95 * mem.nbytes
    assert bool((mem.caches[0].key == 0).all())
    mem.release()
    mem.release()                                              # idempotent
