"""A device's side of a DeviceSample: the ledger by holder and kind, the weight
store's copies, and memory measured per process.

Plain Python over the arbiter, the store and the probe; the supervisor adds the
services' own reports (which it fetches over Ray) and calls device_sample().
"""
from __future__ import annotations

import collections

import logging
import os

import psutil

from colocate.version import __version__
from colocate.config import DeploymentConfig, DeviceSpec
from colocate.memory.arbiter import MemoryArbiter
from colocate.memory.probe import cuda_process_memory, device_process_memory
from colocate.memory.sizing import ModelFootprint
from colocate.memory.weight_store import WeightStore
from colocate.metrics.samples import (DEVICE, SLOT_STATES, DeviceSample, Reservation,
                                      ServiceReport, ServiceSample, WeightCopy)

log = logging.getLogger(__name__)

# An unshared copy is published as "<model>@<service>" (see the supervisor).
UNSHARED_SEPARATOR = "@"


def ledger_reservations(arbiter: MemoryArbiter) -> tuple[Reservation, ...]:
    """The arbiter's books, split by holder and kind; they add up to reserved_bytes.

    Built from the admitted demands rather than by parsing the ledger's row texts,
    which are written for people."""
    rows = [Reservation(DEVICE, "headroom", arbiter.headroom),
            Reservation(DEVICE, "runtime", arbiter.supervisor_bytes)]
    demands = arbiter.admitted()
    if arbiter.share_weights:
        for model in dict.fromkeys(d.model for d in demands):
            rows.append(Reservation(DEVICE, "weights", arbiter.footprint(model).weight_bytes()))
    for d in demands:
        if not arbiter.share_weights:
            rows.append(Reservation(d.service, "weights", d.weight_bytes))
        rows += [Reservation(d.service, "kv_cache", d.kv_bytes),
                 Reservation(d.service, "workspace", d.workspace_bytes),
                 Reservation(d.service, "runtime", d.runtime_bytes)]
    return tuple(rows)


def weight_copies(store: WeightStore) -> tuple[WeightCopy, ...]:
    out = []
    for name in store.models():
        model, _, service = name.partition(UNSHARED_SEPARATOR)
        out.append(WeightCopy(service or DEVICE, model, store.bytes_of(name)))
    return tuple(out)


def measured_memory(device: str, pids: list[int]) -> dict[int, int]:
    """{pid: bytes} as the probe measures them; a process that is gone (or, on CUDA,
    a driver that cannot be read) is left out rather than failing the scrape."""
    if device.startswith("cuda"):
        try:
            reading = cuda_process_memory(device, pids)
        except Exception as exc:       # no NVML here: report nothing, say why once per scrape
            log.warning("cannot measure %s per process: %s", device, exc)
            return {}
        if not reading.per_process:
            # In a container NVML's pids are the host's: the device total goes on the
            # device's own row (the supervisor, pids[0]) and the services read 0.
            log.warning("%s", reading.note)
            return {pids[0]: reading.device_used}
        return reading.by_pid
    out = {}
    for pid in pids:
        try:
            out.update(device_process_memory(device, [pid]))
        except psutil.Error:           # it died between the report and the measurement
            pass
    return out


def device_sample(gpu: DeviceSpec, config: DeploymentConfig, arbiter: MemoryArbiter,
                  store: WeightStore, local_device: str,
                  reports: dict[str, tuple[ServiceReport, int]],
                  replacements: int = 0, slot_states: dict[str, str] | None = None
                  ) -> DeviceSample:
    """reports: service name -> (its report, its restarts), for the services that
    answered; the others are absent from this scrape but for their state, which
    slot_states (service -> the supervisor's slot state) gives for every one."""
    demands = {d.service: d for d in arbiter.admitted()}
    pids = [os.getpid()] + [report.pid for report, _ in reports.values()]
    memory = measured_memory(local_device, pids)
    # The services of a fused group share one process: its memory is split equally
    # among them, so the services' figures still add up to what the processes hold.
    sharers = collections.Counter(report.pid for report, _ in reports.values())
    services = []
    for spec in gpu.services:
        if spec.name not in reports or spec.name not in demands:
            continue
        report, restarts = reports[spec.name]
        demand = demands[spec.name]
        model = config.models[spec.model]
        services.append(ServiceSample(
            name=spec.name, model=spec.model, dtype=report.dtype,
            # as the weights sit: a GGUF kept as stored reports its int4 / int8
            quantization=ModelFootprint.of(model).quantization[0] or "none",
            kv_dtype=demand.kv_dtype,
            kv_budget_bytes=demand.kv_bytes, restarts=restarts, report=report,
            memory_used_bytes=memory.get(report.pid, 0) // sharers[report.pid]))
    return DeviceSample(
        gpu=gpu.device, version=__version__, capacity_bytes=arbiter.capacity,
        supervisor_memory_bytes=memory.get(os.getpid(), 0), services=tuple(services),
        reservations=ledger_reservations(arbiter), weights=weight_copies(store),
        replacements=replacements,
        states=tuple((name, SLOT_STATES[state]) for name, state in (slot_states or {}).items()
                     if state in SLOT_STATES))
