"""GPU naming and NVML readings, against a fake pynvml (no GPU here).

The fake holds two GPUs in PCI order; what is checked is the mapping from a
process's cuda:N to NVML's GPU, the UUID the shared ledger is keyed by, and the
device-total fallback when NVML's pids are not this PID namespace's.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest

from colocate.memory import cuda_devices, probe
from colocate.memory.cuda_devices import ProbeError, gpu_uuid, use_pci_bus_order
from colocate.metrics.device import measured_memory
from colocate.cluster.supervisor import service_cuda_env

GIB = 2**30


@dataclass
class FakeProc:
    pid: int
    usedGpuMemory: int | None


def fake_nvml(procs: dict[int, list[FakeProc]], used: dict[int, int]):
    """A pynvml stand-in over GPUs 0 and 1 (NVML = PCI order)."""
    uuids = {0: "GPU-aaaa", 1: "GPU-bbbb"}
    nvml = types.SimpleNamespace(calls=[])
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetHandleByUUID = lambda u: {v: k for k, v in uuids.items()}[u]
    nvml.nvmlDeviceGetUUID = lambda h: uuids[h].encode()   # older pynvml returns bytes
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: procs.get(h, [])
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used.get(h, 0),
                                                                   total=80 * GIB)
    return nvml


@pytest.fixture
def nvml(monkeypatch):
    def install(procs=None, used=None, visible=None, order="PCI_BUS_ID"):
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(procs or {}, used or {}))
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    return install


def test_import_colocate_sets_pci_bus_order_unless_chosen():
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_ORDER"}
    out = subprocess.run([sys.executable, "-c", "import os, colocate; "
                          "print(os.environ['CUDA_DEVICE_ORDER'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PCI_BUS_ID"
    env = {}
    use_pci_bus_order(env)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    chosen = {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    use_pci_bus_order(chosen)
    assert chosen["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_uuid_follows_the_visible_devices(nvml):
    nvml(visible="1")                          # Ray gave this process physical GPU 1
    assert gpu_uuid("cuda:0") == "GPU-bbbb"
    nvml(visible="GPU-aaaa")
    assert gpu_uuid("cuda:0") == "GPU-aaaa"
    nvml(visible=None)
    assert gpu_uuid("cuda:1") == "GPU-bbbb"
    nvml(visible="0")
    with pytest.raises(ProbeError, match="not in CUDA_VISIBLE_DEVICES"):
        gpu_uuid("cuda:1")


def test_fastest_first_order_is_matched_by_uuid_not_index(nvml, monkeypatch):
    nvml(visible="0", order="FASTEST_FIRST")
    # CUDA's device 0 is the faster GPU, which NVML (PCI order) calls 1.
    monkeypatch.setattr(cuda_devices, "_torch_uuid", lambda index: "GPU-bbbb")
    assert gpu_uuid("cuda:0") == "GPU-bbbb"


def test_per_process_memory_by_pid(nvml):
    me = os.getpid()
    nvml(procs={0: [FakeProc(me, 3 * GIB), FakeProc(me + 1, None)]}, used={0: 5 * GIB})
    reading = probe.cuda_process_memory("cuda:0", [me, me + 1])
    assert reading.per_process and reading.by_pid == {me: 3 * GIB, me + 1: 0}
    assert reading.device_used == 5 * GIB
    assert probe.device_process_memory("cuda:0", [me]) == {me: 3 * GIB}


def test_host_pids_fall_back_to_the_device_total(nvml, caplog):
    """In a container NVML lists host pids: none is ours."""
    me = os.getpid()
    nvml(procs={0: [FakeProc(4_000_001, 3 * GIB), FakeProc(4_000_002, 2 * GIB)]},
         used={0: 6 * GIB})
    reading = probe.cuda_process_memory("cuda:0", [me, 17])
    assert not reading.per_process and reading.by_pid == {}
    assert reading.device_used == 6 * GIB and "PID namespace" in reading.note
    with caplog.at_level(logging.WARNING):
        # The scrape puts the device total on the device's own row, pids[0].
        assert measured_memory("cuda:0", [me, 17]) == {me: 6 * GIB}
    assert "PID namespace" in caplog.text


def test_an_idle_gpu_is_not_a_fallback(nvml):
    nvml(procs={}, used={0: 0})
    reading = probe.cuda_process_memory("cuda:0", [os.getpid()])
    assert reading.per_process and reading.by_pid == {}


def test_service_env_keeps_the_gpu_visible():
    env = service_cuda_env("3")
    assert env == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                   "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
