"""WeightPages: a CPU service's mapping of its model's weight file, whose pages a sleeping
service gives back and a waking one asks for again.

A model published for services that may sleep (`sleep_after_idle`) is kept in a file on
disk (WeightStore.publish(on_disk=True)) rather than in /dev/shm: its pages are then
page-cache pages the kernel may drop and read back, where tmpfs pages are the file itself
and stay in memory as long as it exists. Sleeping, a service unmaps its view of every
page (madvise MADV_DONTNEED: the mapping and its addresses stay, so the model's tensors,
and the C decode plan's raw pointers into them, stay valid) and asks the kernel to drop
the file's cached pages (posix_fadvise DONTNEED). The kernel drops only pages no process
maps, so the copy's memory returns once the last service of the model on the machine
sleeps, and an awake neighbour keeps every page it uses. Waking asks for read-ahead
(MADV_WILLNEED); the first step faults in whatever has not arrived. On a tmpfs file the
same calls change nothing but this process's resident count.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import torch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class WeightPages:
    def __init__(self, flat: torch.Tensor, path: str) -> None:
        self.flat = flat                          # (nbytes,) uint8 over the file's mapping
        self.path = path

    def _advise(self, advice: int) -> None:
        # The mapping starts on a page (mmap returned it); its length need not be whole.
        if _libc.madvise(self.flat.data_ptr(), self.flat.numel(), advice) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise({advice}) on {self.path}: {os.strerror(err)}")

    def release(self) -> None:
        """Unmap this process's pages and drop the file's pages nobody maps."""
        self._advise(mmap.MADV_DONTNEED)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def prefetch(self) -> None:
        """Ask the kernel to read the file back ahead of the first step."""
        self._advise(mmap.MADV_WILLNEED)
