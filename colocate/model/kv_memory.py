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
"""
from __future__ import annotations

import gc
import logging
import mmap

import torch

from colocate.model.kv_cache import KV_SCALE_DTYPE, LayerKVCache

log = logging.getLogger(__name__)

# Every view starts on this boundary: enough for any dtype and for vector loads.
_ALIGN = 256
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)          # Linux only
_CPU_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # Linux, macOS


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class KVCacheMemory:
    """The KV caches of every layer, in one region that release() frees whole and
    allocate() makes again (zeroed: whatever the pool held is gone)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.quantized = dtype == torch.int8
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
        if self.device.type == "cpu":
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

    # ---- one range of blocks sleeping alone --------------------------------------
    @property
    def can_drop_blocks(self) -> bool:
        return self.device.type == "cpu" and _MADV_DONTNEED is not None

    def drop_blocks(self, first: int, count: int) -> int:
        """Give back the whole pages of blocks first .. first+count-1 (CPU); returns the
        bytes given back. Their contents are gone: zero_blocks() before using them."""
        if not self.can_drop_blocks:
            raise RuntimeError(f"a block range of a {self.device.type} KV cache cannot be "
                               "freed alone; release() the whole cache")
        self._check_allocated()
        page, dropped = mmap.PAGESIZE, 0
        for start, end in self.block_spans(first, count):
            lo, hi = -(-start // page) * page, end // page * page   # whole pages inside
            if hi > lo:
                self._region.madvise(_MADV_DONTNEED, lo, hi - lo)
                dropped += hi - lo
        return dropped

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
