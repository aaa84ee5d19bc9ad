"""Naming one physical GPU the same way in CUDA, NVML and every process.

Three numberings meet here. CUDA's device indices follow CUDA_DEVICE_ORDER, whose
default is FASTEST_FIRST; NVML numbers GPUs by PCI bus id; and cuda:N inside a process
counts only the GPUs CUDA_VISIBLE_DEVICES lists (Ray sets it per actor). Mapping a
CUDA index to an NVML index is only right when CUDA also orders by PCI bus id, so
`use_pci_bus_order` makes that the default for every colocate process (it must run
before CUDA initialises; `import colocate` calls it). Where a user forced another
order, devices are matched by UUID instead.

Across processes (the shared ledger of one device, two `colocate serve` runs) a GPU
is named by its UUID: stable, and the same whatever any process's visible list is.
Everything imports pynvml and torch lazily: CPU-only paths never load them.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

ORDER_ENV = "CUDA_DEVICE_ORDER"
PCI_ORDER = "PCI_BUS_ID"


class ProbeError(RuntimeError):
    """The device cannot be measured here (no driver, no such GPU)."""


def use_pci_bus_order(env: MutableMapping[str, str] = os.environ) -> None:
    """CUDA_DEVICE_ORDER=PCI_BUS_ID unless the user chose an order."""
    env.setdefault(ORDER_ENV, PCI_ORDER)


def cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


@contextmanager
def nvml_device(index: int) -> Iterator[tuple[object, object]]:
    """(pynvml module, handle of cuda:index), with NVML initialised for the block."""
    import pynvml
    pynvml.nvmlInit()
    try:
        yield pynvml, nvml_handle(pynvml, index)
    finally:
        pynvml.nvmlShutdown()


def nvml_handle(pynvml, index: int):
    """The NVML handle of this process's cuda:index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entry = str(index)
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(entries):
            raise ProbeError(f"cuda:{index} is not in CUDA_VISIBLE_DEVICES={visible}")
        entry = entries[index]
    if not entry.isdigit():                        # a UUID (or MIG id) names the GPU itself
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    if os.environ.get(ORDER_ENV, "FASTEST_FIRST") == PCI_ORDER:
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    # CUDA numbers fastest-first here, so its index says nothing about NVML's: ask CUDA
    # which GPU it means (this initialises the CUDA runtime, without a context).
    return pynvml.nvmlDeviceGetHandleByUUID(_torch_uuid(index))


def _torch_uuid(index: int) -> str:
    import torch
    return f"GPU-{torch.cuda.get_device_properties(index).uuid}"


def gpu_uuid(device: str) -> str:
    """The UUID ("GPU-...") of this process's `device` ("cuda:N")."""
    index = cuda_index(device)
    try:
        with nvml_device(index) as (nvml, handle):
            uuid = nvml.nvmlDeviceGetUUID(handle)
        return uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    except ProbeError:
        raise
    except Exception as nvml_error:                # no NVML here: CUDA knows the UUID too
        try:
            return _torch_uuid(index)
        except Exception:
            raise ProbeError(f"cannot read the UUID of cuda:{index}: {nvml_error}") from None
