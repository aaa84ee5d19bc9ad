"""A state dict packed into one flat byte buffer, and views that unpack it without copying.

The weight store keeps each model as ONE contiguous buffer: a file under /dev/shm on
CPU, one device allocation on CUDA. A layout (a TensorSpec per tensor) says where each
tensor lives in it; the layout is plain data, so it travels to other processes inside
the picklable WeightHandle and the same code unpacks a CPU mapping or a CUDA buffer.

Every offset is a multiple of ALIGN (64 bytes: a cache line, and a multiple of every
dtype's size), so `flat[offset:].view(dtype)` is legal and vector loads stay aligned.
The file mapping itself starts on a page boundary.
"""
from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from colocate import progress

ALIGN = 64


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in the flat buffer (a contiguous, row-major block)."""
    name: str
    dtype: str                   # torch dtype name without "torch.", e.g. "float16"
    shape: tuple[int, ...]
    offset: int                  # bytes from the buffer start, a multiple of ALIGN

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = self.torch_dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def plan_layout(tensors: dict[str, torch.Tensor],
                align: int = ALIGN) -> tuple[tuple[TensorSpec, ...], int]:
    """One aligned slot per tensor in the dict's order -> (specs, total buffer bytes)."""
    specs, at = [], 0
    for name, t in tensors.items():
        spec = TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), at)
        specs.append(spec)
        at = _round_up(at + spec.nbytes, align)
    return tuple(specs), max(at, align)        # never 0 bytes: mmap cannot map an empty file


def unpack(flat: torch.Tensor, specs: tuple[TensorSpec, ...]) -> dict[str, torch.Tensor]:
    """Views of `flat` (a 1-D uint8 tensor, any device) shaped by `specs`; no data is copied."""
    return {s.name: flat[s.offset:s.offset + s.nbytes].view(s.torch_dtype).view(s.shape)
            for s in specs}


def pack(tensors: dict[str, torch.Tensor], specs: tuple[TensorSpec, ...],
         flat: torch.Tensor) -> None:
    """Copy each tensor into its slot of `flat` (casting device, never dtype or shape):
    publishing, shown as a stage of tensors and bytes."""
    with progress.stage("publishing", total=len(specs), unit="tensor") as bar:
        for name, view in unpack(flat, specs).items():
            view.copy_(tensors[name])
            bar.advance(1, nbytes=view.nbytes)


def write_file(path: Path, tensors: dict[str, torch.Tensor],
               specs: tuple[TensorSpec, ...], size: int, durable: bool = False) -> None:
    """Create `path` holding the packed tensors; it must not exist (stores never share files).
    durable: written back to disk before returning, so that its page-cache pages are
    clean and the kernel can drop them when no process maps them (weight_pages.py)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)                 # padding between slots reads as zeros
        with mmap.mmap(fd, size, access=mmap.ACCESS_WRITE) as mm:
            flat = torch.frombuffer(mm, dtype=torch.uint8)
            pack(tensors, specs, flat)
            # The mmap cannot close while a tensor still exports its buffer.
            del flat
            if durable:
                mm.flush()
        if durable:
            os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def map_file_read_only(path: str | Path, size: int) -> torch.Tensor:
    """The whole file as a 1-D uint8 tensor over a read-only shared mapping.

    The tensor keeps the mmap alive; the pages are the page-cache pages of the file,
    shared by every process that maps it. A store (a write) through the tensor hits a
    PROT_READ page and kills the process with SIGSEGV: loud, and never a private
    copy that silently diverges, as a copy-on-write (MAP_PRIVATE) mapping would.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ValueError(f"{path}: {actual} bytes, the handle says {size}; stale handle?")
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)                            # the mapping outlives the descriptor
    with warnings.catch_warnings():
        # torch warns that it cannot mark tensors read-only; the mapping enforces it.
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(mm, dtype=torch.uint8)
