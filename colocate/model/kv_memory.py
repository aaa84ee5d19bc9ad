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
_CPU_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE


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

    @property
    def nbytes(self) -> int:
        """Bytes of the region, alignment padding included: what release() frees."""
        per_layer = sum(_aligned(torch.Size(s).numel() * d.itemsize) for s, d in self._parts())
        return self.num_layers * per_layer

    @property
    def allocated(self) -> bool:
        return self._caches is not None

    @property
    def caches(self) -> list[LayerKVCache]:
        if self._caches is None:
            raise RuntimeError("the KV cache is released (the engine sleeps); allocate() first")
        return self._caches

    # ---- allocate / release ----------------------------------------------------
    def allocate(self) -> None:
        if self._caches is not None:
            return
        size = self.nbytes
        if self.device.type == "cpu":
            self._region = mmap.mmap(-1, size, flags=_CPU_MAP_FLAGS)
            base = torch.frombuffer(self._region, dtype=torch.uint8)          # (size,)
            if not _POPULATE:
                base.zero_()         # make the pages resident (they are zeros already)
        else:
            base = torch.zeros(size, dtype=torch.uint8, device=self.device)
        caches, offset = [], 0
        for _ in range(self.num_layers):
            views = []
            for shape, dtype in self._parts():
                n = torch.Size(shape).numel() * dtype.itemsize
                views.append(base[offset:offset + n].view(dtype).view(shape))
                offset += _aligned(n)
            caches.append(LayerKVCache(*views))
        self._base, self._caches = base, caches

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
