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


def resident() -> int:
    """This process's own pages, counted from its page tables (smaps): exact, where
    RSS lags behind a multi-threaded fill by up to 64 pages per thread."""
    return psutil.Process().memory_full_info().uss


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_a_block_range_gives_its_pages_back_alone_and_comes_back_zeroed(dtype):
    """Three ranges of 1024 blocks, as three members of a fused group: dropping the
    middle one frees its pages (this process's USS falls by about its share) and leaves
    the other two's values as they were; zero_blocks makes it resident and zero."""
    mem = KVCacheMemory(4, 1 + 3 * 1024, 16, 4, 32, dtype)
    tensors = [t for c in mem.caches for t in (c.key, c.value, c.key_scale, c.value_scale)
               if t is not None]
    for t in tensors:
        t.fill_(7)
    middle = sum(end - start for start, end in mem.block_spans(1025, 1024))
    assert middle > 0.33 * mem.nbytes
    held = resident()
    dropped = mem.drop_blocks(1025, 1024)
    freed = held - resident()
    assert dropped > 0.99 * middle and freed > 0.95 * dropped, (freed / MiB, dropped / MiB)
    for t in tensors:
        assert bool((t[1:1025] == 7).all()) and bool((t[2049:] == 7).all())   # neighbours
        # Its whole pages read zero now; a page at each end shared with a neighbour stays.
        assert (t[1025:2049] == 0).float().mean() > 0.95
    mem.zero_blocks(1025, 1024)
    assert resident() - (held - freed) > 0.95 * dropped
    for t in tensors:
        assert bool((t[1025:2049] == 0).all())             # the fringes too
        assert bool((t[1:1025] == 7).all()) and bool((t[2049:] == 7).all())
    with pytest.raises(ValueError, match="outside the 3073 blocks"):
        mem.drop_blocks(2049, 1025)
    mem.release()
    with pytest.raises(RuntimeError, match="released"):
        mem.drop_blocks(1, 1)


def test_a_map_that_is_not_resident_takes_memory_only_where_it_is_zeroed():
    mem = KVCacheMemory(4, 1 + 2 * 1024, 16, 4, 32, torch.float32)
    mem.release()
    before = resident()
    mem.allocate(resident=False)
    mapped = resident()
    assert mapped - before < 0.05 * mem.nbytes
    mem.zero_blocks(1, 1024)                     # the first of two ranges
    grew = resident() - mapped
    assert 0.45 * mem.nbytes < grew < 0.55 * mem.nbytes, grew / MiB
    mem.release()


def file_bytes(path) -> int:
    """Bytes the file really holds (tmpfs or disk), not its length."""
    import os
    return os.stat(path).st_blocks * 512


def test_a_shared_pool_file_is_one_cache_and_each_mapper_gives_back_only_its_range(tmp_path):
    """Isolated lending's pool file (engine/shared_lending.py): two processes' mappings
    of one file, each owning a range of 1024 blocks; a block written through one is
    read through the other, and a release punches only the releaser's pages."""
    path = str(tmp_path / "kv.pool")
    a = KVCacheMemory(4, 1 + 2 * 1024, 16, 4, 32, torch.float32, shared_file=path,
                      own_blocks=(1, 1024))
    b = KVCacheMemory(4, 1 + 2 * 1024, 16, 4, 32, torch.float32, shared_file=path,
                      own_blocks=(1025, 1024))
    range_bytes = sum(end - start for start, end in a.block_spans(1, 1024))
    resident = file_bytes(path)                 # both ranges made resident
    assert resident > 1.9 * range_bytes, (resident / MiB, range_bytes / MiB)
    b.caches[2].value[1030].fill_(7.0)          # a block of b's range, lent to a
    a.caches[2].value[1031].fill_(5.0)          # a's write into b's range
    assert bool((a.caches[2].value[1030] == 7.0).all())
    assert bool((b.caches[2].value[1031] == 5.0).all())
    a.caches[0].key[3].fill_(2.0)
    a.release()
    assert resident - file_bytes(path) > 0.98 * range_bytes
    assert bool((b.caches[2].value[1030] == 7.0).all())     # b's range untouched
    assert bool((b.caches[2].value[1031] == 5.0).all())
    a.allocate()
    assert bool((a.caches[0].key[3] == 0).all())             # its punched pages read zero
    assert file_bytes(path) > 0.98 * resident
    assert b.drop_blocks(1025, 1024) > 0.98 * range_bytes    # a member sleeping alone
    assert resident - file_bytes(path) > 0.98 * range_bytes
    a.release()
    b.release()


def test_a_pool_file_of_another_layout_is_refused(tmp_path):
    path = str(tmp_path / "kv.pool")
    KVCacheMemory(2, 9, 16, 4, 32, torch.float32, shared_file=path, own_blocks=(1, 8)).release()
    with pytest.raises(ValueError, match="another deployment's file"):
        KVCacheMemory(2, 17, 16, 4, 32, torch.float32, shared_file=path, own_blocks=(1, 8))
    with pytest.raises(ValueError, match="needs own_blocks"):
        KVCacheMemory(2, 9, 16, 4, 32, torch.float32, shared_file=path)
