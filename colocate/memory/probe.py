"""What a device holds and what processes use on it: psutil on CPU, NVML on CUDA.

The planner asks for capacity; the arbiter later compares measured use with the
ledger. Everything CUDA sits behind `_is_cuda(device)` and imports pynvml or
torch.cuda lazily, so CPU-only paths never load them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import psutil


class ProbeError(RuntimeError):
    """The device cannot be measured here (no driver, no such GPU)."""


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


# ---- capacity ----------------------------------------------------------------------

def device_capacity(device: str) -> int:
    """Total bytes of `device` ("cpu" or "cuda:N")."""
    if not _is_cuda(device):
        return psutil.virtual_memory().total
    return _cuda_capacity(_cuda_index(device))


def _cuda_capacity(index: int) -> int:
    # NVML first: it reads the driver without creating a CUDA context, which would
    # itself take hundreds of MiB of the memory being measured.
    try:
        with _nvml_device(index) as (nvml, handle):
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
    except Exception as nvml_error:  # no library, no driver, or no such GPU
        try:
            import torch
            if torch.cuda.is_available() and index < torch.cuda.device_count():
                return int(torch.cuda.mem_get_info(index)[1])
        except Exception:
            pass
        raise ProbeError(f"cannot read the memory of cuda:{index} ({nvml_error}); "
                         f"set `memory:` for this device in the YAML") from None


@contextmanager
def _nvml_device(index: int) -> Iterator[tuple[object, object]]:
    """(pynvml module, handle of cuda:index), with NVML initialised for the block."""
    import pynvml
    pynvml.nvmlInit()
    try:
        yield pynvml, _nvml_handle(pynvml, index)
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml, index: int):
    """NVML numbers GPUs physically; cuda:N counts only CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if index >= len(entries):
            raise ProbeError(f"cuda:{index} is not in CUDA_VISIBLE_DEVICES={visible}")
        entry = entries[index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


# ---- measured use ------------------------------------------------------------------

def process_memory(pid: int | None = None) -> int:
    """Host memory of a process: PSS where the OS reports it, else RSS.

    PSS splits shared pages among the processes mapping them, so weights held in
    shared memory by several services are not counted once per service.
    """
    proc = psutil.Process(pid)
    try:
        return int(proc.memory_full_info().pss)
    except (AttributeError, psutil.AccessDenied):  # not Linux, or not our process
        return int(proc.memory_info().rss)


def device_process_memory(device: str, pids: list[int] | None = None) -> dict[int, int]:
    """Bytes each process holds on `device`: {pid: bytes}, only `pids` if given.

    On CPU that is host memory (PSS/RSS) and needs `pids`; on CUDA it is what NVML
    reports for the processes with a context on the GPU.
    """
    if not _is_cuda(device):
        return {pid: process_memory(pid) for pid in (pids or [os.getpid()])}
    with _nvml_device(_cuda_index(device)) as (nvml, handle):
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    # usedGpuMemory is None where the driver hides it (e.g. in some containers).
    usage = {p.pid: int(p.usedGpuMemory or 0) for p in procs}
    return {pid: b for pid, b in usage.items() if pids is None or pid in pids}


def device_used(device: str) -> int:
    """Bytes in use on the whole device, by anyone."""
    if not _is_cuda(device):
        vm = psutil.virtual_memory()
        return int(vm.total - vm.available)
    with _nvml_device(_cuda_index(device)) as (nvml, handle):
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
