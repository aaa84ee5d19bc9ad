"""What a device holds and what processes use on it: psutil on CPU, NVML on CUDA.

The planner asks for capacity; the arbiter later compares measured use with the
ledger. Everything CUDA sits behind `_is_cuda(device)` and imports pynvml or
torch.cuda lazily, so CPU-only paths never load them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from colocate.memory.cuda_devices import ProbeError, cuda_index, nvml_device

__all__ = ["ProbeError", "ProcessMemory", "cuda_process_memory", "device_capacity",
           "device_process_memory", "device_used", "process_memory"]


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


# ---- capacity ----------------------------------------------------------------------

def device_capacity(device: str) -> int:
    """Total bytes of `device` ("cpu" or "cuda:N")."""
    if not _is_cuda(device):
        return psutil.virtual_memory().total
    return _cuda_capacity(cuda_index(device))


def _cuda_capacity(index: int) -> int:
    # NVML first: it reads the driver without creating a CUDA context, which would
    # itself take hundreds of MiB of the memory being measured.
    try:
        with nvml_device(index) as (nvml, handle):
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
    return cuda_process_memory(device, pids).by_pid


@dataclass(frozen=True)
class ProcessMemory:
    """What NVML says about the processes on one GPU."""
    by_pid: dict[int, int]       # bytes per pid NVML reported and this process can name
    device_used: int             # bytes in use on the whole GPU, by anyone
    per_process: bool            # False: only device_used is known (see note)
    note: str = ""


def cuda_process_memory(device: str, pids: list[int] | None = None) -> ProcessMemory:
    """Per-process device memory, or the device total where NVML's pids are not ours.

    NVML reports pids as the host sees them. Inside a container (another PID
    namespace) none of them is os.getpid() or a service's pid, and a per-process
    reading would silently be 0 for everyone; this says so instead and keeps the
    device total, which is still true.
    """
    with nvml_device(cuda_index(device)) as (nvml, handle):
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    # usedGpuMemory is None where the driver hides it (e.g. in some containers).
    usage = {p.pid: int(p.usedGpuMemory or 0) for p in procs}
    mine = {pid: b for pid, b in usage.items() if pids is None or pid in pids}
    if pids and not mine and (procs or used):
        note = (f"NVML lists {len(procs)} process(es) on {device}, none of pids {sorted(pids)}: "
                "it reports host pids, and this process runs in another PID namespace "
                "(a container). Per-process device memory is unknown; only the device "
                "total is reported.")
        return ProcessMemory({}, used, per_process=False, note=note)
    return ProcessMemory(mine, used, per_process=True)


def device_used(device: str) -> int:
    """Bytes in use on the whole device, by anyone."""
    if not _is_cuda(device):
        vm = psutil.virtual_memory()
        return int(vm.total - vm.available)
    with nvml_device(cuda_index(device)) as (nvml, handle):
        return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
