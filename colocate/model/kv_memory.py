"""KVCacheMemory: one engine's KV pool as one allocation that can really be given back.

A service that sleeps (`sleep_after_idle`) must return its pool to the machine, not
to an allocator that keeps it for later. So every tensor of the pool (each layer's
keys and values, and their scales when int8) is a view into one region:

- CPU: an anonymous mmap. Closing it unmaps the pages, so the machine's available
  memory rises by the pool's size at once; a malloc'd tensor of a few MiB may instead
  be kept in the heap (glibc raises its mmap threshold up to 32 MiB after a free).
- CUDA: one torch allocation; once dropped, `torch.cuda.empty_cache()` hands the
  segment back to the driver instead of keeping it in torch's caching allocator.

The region is zeroed and resident when allocated (see kv_cache.allocate_kv_caches for
why zeros): the budget the arbiter booked is held while awake, not merely promised.
On Linux the CPU mapping is populated by the kernel at mmap time (MAP_POPULATE), whose
fresh anonymous pages are zeros: measured here 2-5x faster than touching every page
with a memset, and a wake's latency is mostly this.

A range of blocks can sleep alone (a member of a fused group: its pool is a block
range of the group's one region). On CPU, drop_blocks() gives back the whole pages
that range covers in every tensor (madvise MADV_DONTNEED: a private anonymous page so
dropped is freed at once and reads as zeros when next touched); the few pages at each
end that it shares with a neighbour's blocks stay. zero_blocks() then makes the range
resident and zero again, fringes included, before its blocks are used. CUDA memory
cannot be freed in part without virtual memory mapping (cuMemMap), which this does
not do: there a range sleeps only with the whole region (can_drop_blocks is False).

Shared (CPU, `shared_file`): isolated services of one model that lend blocks to each
other (colocate/engine/shared_lending.py) each map ONE pool file under /dev/shm,
MAP_SHARED, laid out as one region whose block ranges are theirs, so a block id means
the same memory in every process. A process then gives back only its own range
(`own_blocks`): release() and drop_blocks() punch its whole pages out of the file
(MADV_REMOVE: tmpfs frees them at once, and they read as zeros after), and unmapping
frees nothing that others use. Nothing in the file is zeroed on allocate: the file
starts as zeros and holds only finite KV values after, which is all attention's
masking needs, and a restarted process must not clear blocks it had lent that a
neighbour still writes. Its own range is made resident instead
(MADV_POPULATE_WRITE, contents untouched; where the kernel lacks it, as pages fill).
"""
from __future__ import annotations

import gc
import logging
import mmap
import os

import torch

from colocate.model.kv_cache import KV_SCALE_DTYPE, LayerKVCache

log = logging.getLogger(__name__)

# Every view starts on this boundary: enough for any dtype and for vector loads.
_ALIGN = 256
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)          # Linux only
_CPU_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux, macOS
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", None)      # Linux: frees a shared file's pages
_MADV_POPULATE_WRITE = 23                             # Linux 5.14+; not in the mmap module


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class KVCacheMemory:
    """The KV caches of every layer, in one region that release() frees whole and
    allocate() makes again (zeroed: whatever the pool held is gone)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 shared_file: str | None = None,
                 own_blocks: tuple[int, int] | None = None) -> None:
        """shared_file: map this pool file (CPU) instead of private memory; own_blocks:
        (first, count), the range this process gives back (see the module note)."""
        self.num_layers = num_layers
        self.shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantized = dtype == torch.int8
        if shared_file is not None and (self.device.type != "cpu" or own_blocks is None):
            raise ValueError("a shared KV pool file is a CPU mapping and needs own_blocks")
        self.shared_file, self.own_blocks = shared_file, own_blocks
        self._region: mmap.mmap | None = None
        self._base: torch.Tensor | None = None       # (nbytes,) uint8 over the region
        self._caches: list[LayerKVCache] | None = None
        self.allocate()

    # ---- sizes ---------------------------------------------------------------
    def _parts(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of one layer's tensors, in layout order."""
        parts = [(self.shape, self.dtype), (self.shape, self.dtype)]
        if self.quantized:
            parts += [(self.shape[:3], KV_SCALE_DTYPE)] * 2
        return parts

    def _layout(self):
        """(offset, shape, dtype) of every tensor in the region, layer by layer."""
        offset = 0
        for _ in range(self.num_layers):
            for shape, dtype in self._parts():
                yield offset, shape, dtype
                offset += _aligned(torch.Size(shape).numel() * dtype.itemsize)

    @property
    def nbytes(self) -> int:
        """Bytes of the region, alignment padding included: what release() frees."""
        per_layer = sum(_aligned(torch.Size(s).numel() * d.itemsize) for s, d in self._parts())
        return self.num_layers * per_layer

    def block_spans(self, first: int, count: int) -> list[tuple[int, int]]:
        """(start, end) bytes of blocks first .. first+count-1 in every tensor."""
        if first < 0 or count < 0 or first + count > self.shape[0]:
            raise ValueError(f"blocks {first}..{first + count - 1} are outside the "
                             f"{self.shape[0]} blocks of this cache")
        spans = []
        for offset, shape, dtype in self._layout():
            per_block = torch.Size(shape[1:]).numel() * dtype.itemsize    # tensors are block-major
            spans.append((offset + first * per_block, offset + (first + count) * per_block))
        return spans

    @property
    def allocated(self) -> bool:
        return self._caches is not None

    @property
    def caches(self) -> list[LayerKVCache]:
        self._check_allocated()
        return self._caches

    def _check_allocated(self) -> None:
        if self._caches is None:
            raise RuntimeError("the KV cache is released (the engine sleeps); allocate() first")

    # ---- allocate / release ----------------------------------------------------
    def allocate(self, resident: bool = True) -> None:
        """Map the region, zeroed. resident=False (CPU) leaves its pages untouched, so
        they take memory only when first written: for a group whose members mostly
        sleep, each waking member then makes its own range resident (zero_blocks)."""
        if self._caches is not None:
            return
        size = self.nbytes
        if self.shared_file is not None:
            self._region = self._map_shared_file(size)
            base = torch.frombuffer(self._region, dtype=torch.uint8)          # (size,)
            if resident:
                self._advise_pages(*self.own_blocks, _MADV_POPULATE_WRITE, tolerate=True)
        elif self.device.type == "cpu":
            populate = _POPULATE if resident else 0
            self._region = mmap.mmap(-1, size, flags=_CPU_MAP_FLAGS | populate)
            base = torch.frombuffer(self._region, dtype=torch.uint8)          # (size,)
            if resident and not _POPULATE:
                base.zero_()         # make the pages resident (they are zeros already)
        else:
            base = torch.zeros(size, dtype=torch.uint8, device=self.device)
        views = [base[offset:offset + torch.Size(shape).numel() * dtype.itemsize]
                 .view(dtype).view(shape) for offset, shape, dtype in self._layout()]
        per_layer = len(self._parts())
        self._caches = [LayerKVCache(*views[i:i + per_layer])
                        for i in range(0, len(views), per_layer)]
        self._base = base

    def _map_shared_file(self, size: int) -> mmap.mmap:
        """The pool file, created at `size` by whichever process comes first."""
        fd = os.open(self.shared_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            have = os.fstat(fd).st_size
            if have == 0:
                os.ftruncate(fd, size)      # the same size from every member: no race
            elif have != size:
                raise ValueError(f"KV pool file {self.shared_file} has {have} bytes; this "
                                 f"model's layout needs {size}: another deployment's file?")
            return mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def _whole_pages(self, first: int, count: int):
        """(start, length) of the whole pages inside blocks first .. first+count-1, per
        tensor; the pages at each end shared with a neighbour's blocks are left out."""
        page = mmap.PAGESIZE
        for start, end in self.block_spans(first, count):
            lo, hi = -(-start // page) * page, end // page * page
            if hi > lo:
                yield lo, hi - lo

    def _advise_pages(self, first: int, count: int, advice: int,
                      tolerate: bool = False) -> int:
        """madvise the whole pages of blocks first .. first+count-1; the bytes advised.
        tolerate: stop quietly where the kernel lacks `advice`."""
        advised = 0
        for lo, length in self._whole_pages(first, count):
            try:
                self._region.madvise(advice, lo, length)
            except OSError:
                if not tolerate:
                    raise
                return advised       # an older kernel: the pages fill as they are written
            advised += length
        return advised

    # ---- one range of blocks sleeping alone --------------------------------------
    @property
    def can_drop_blocks(self) -> bool:
        if self.shared_file is not None:
            return _MADV_REMOVE is not None
        return self.device.type == "cpu" and _MADV_DONTNEED is not None

    def drop_blocks(self, first: int, count: int) -> int:
        """Give back the whole pages of blocks first .. first+count-1 (CPU); returns the
        bytes given back. Their contents are gone: zero_blocks() before using them."""
        if not self.can_drop_blocks:
            raise RuntimeError(f"a block range of a {self.device.type} KV cache cannot be "
                               "freed alone; release() the whole cache")
        self._check_allocated()
        advice = _MADV_REMOVE if self.shared_file is not None else _MADV_DONTNEED
        return self._advise_pages(first, count, advice)

    def zero_blocks(self, first: int, count: int) -> None:
        """Zero blocks first .. first+count-1 in every tensor: a dropped range becomes
        resident again, and what its pages shared with the neighbours is cleared."""
        self._check_allocated()
        for start, end in self.block_spans(first, count):
            self._base[start:end].zero_()

    def release(self) -> None:
        """Free the region now. The caller must hold no view of it (the engine holds
        none between steps); a view still alive keeps the CPU region mapped until it
        dies, which is logged, since then the memory is not yet back."""
        if self._caches is None:
            return
        if self.shared_file is not None:
            self._advise_pages(*self.own_blocks, _MADV_REMOVE)   # unmapping frees no shared page
        self._caches = self._base = None
        gc.collect()                 # views caught in a reference cycle must not pin it
        if self.device.type == "cpu":
            region, self._region = self._region, None
            try:
                region.close()
            except BufferError:
                log.warning("KV cache region still referenced; it is unmapped when the "
                            "last view is dropped")
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()
