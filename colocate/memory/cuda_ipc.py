"""CUDA IPC exports of published weight buffers: one reduction per consumer, and the
exporter's buffer kept alive while any consumer may still map it.

torch counts CUDA IPC references per send, not per buffer: each `reduce_tensor` call
makes a fresh reference counter (starting at 1) that the one importer built from it
decrements when its view dies. While the exporter holds its tensor nothing is freed;
once it lets go, torch keeps the block out of the caching allocator until every
counter it handed out reaches zero. Sending ONE reduction to several services (or to
every restart of one) breaks that: the first importer to exit takes the counter to
zero, and the block can be handed back to the allocator, and reused, while the other
services still read their weights from it.

So every consumer gets its own reduction (a lease), and the store additionally keeps
the tensor itself until the model is released AND every lease has ended: freeing then
never depends on torch's counters alone, which a consumer killed by SIGKILL never
decrements (its block then stays held until the exporter exits: a leak, never a
corruption).

The reduction is injectable so the bookkeeping is tested on a machine without a GPU.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Reducer = Callable[[torch.Tensor], tuple]       # buffer -> picklable rebuild arguments


def reduce_cuda_tensor(buffer: torch.Tensor) -> tuple:
    """torch's own reduction: (tensor cls, size, ..., IPC mem handle, ref counter, event)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _rebuild, args = reduce_tensor(buffer)
    return args


def rebuild_cuda_tensor(args: tuple) -> torch.Tensor:
    """The importer's view of the exporter's allocation, from one lease's arguments."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor as rebuild

    return rebuild(*args)


@dataclass
class _Export:
    buffer: torch.Tensor
    leases: set[str] = field(default_factory=set)
    retired: bool = False


class IpcExports:
    """The CUDA buffers one weight store exports, by model name. Not thread-safe."""

    def __init__(self, reduce: Reducer | None = None) -> None:
        self._reduce = reduce or reduce_cuda_tensor
        self._exports: dict[str, _Export] = {}
        self._ids = itertools.count()

    def add(self, name: str, buffer: torch.Tensor) -> None:
        if name in self._exports:
            raise ValueError(f"{name!r} is already exported")
        self._exports[name] = _Export(buffer)

    def lease(self, name: str) -> tuple[str, tuple]:
        """A fresh reduction for one consumer: (lease id, its rebuild arguments)."""
        export = self._exports[name]
        if export.retired:
            raise KeyError(f"{name!r} was released; publish it again")
        lease = f"{name}#{next(self._ids)}"
        args = self._reduce(export.buffer)
        export.leases.add(lease)
        return lease, args

    def end(self, name: str, lease: str) -> None:
        """The consumer of `lease` is gone (stopped or killed). Ending twice is a no-op."""
        export = self._exports.get(name)
        if export is None:
            return
        export.leases.discard(lease)
        self._drop_if_done(name)

    def retire(self, name: str) -> None:
        """The store forgets the model; its buffer goes once the last lease ends."""
        export = self._exports.get(name)
        if export is not None:
            export.retired = True
            self._drop_if_done(name)

    def leases(self, name: str) -> int:
        export = self._exports.get(name)
        return 0 if export is None else len(export.leases)

    def held(self) -> list[str]:
        """Models whose buffers this store still holds (retired ones included)."""
        return list(self._exports)

    def held_bytes(self) -> int:
        return sum(e.buffer.nbytes for e in self._exports.values())

    def _drop_if_done(self, name: str) -> None:
        export = self._exports[name]
        if export.retired and not export.leases:
            del self._exports[name]             # the last reference: torch may free it now
