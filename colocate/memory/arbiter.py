"""MemoryArbiter: the ledger of one device, and admission against it.

capacity >= headroom + supervisor runtime
            + weights (once per model when shared, once per service when not)
            + per service: KV budget + activation workspace + runtime overhead
              (batching: fused: one workspace, for the largest step, and one runtime
              per group of services of one model, which share one process)

A service is admitted only if its whole share fits in what is free; otherwise the
refusal says by how many bytes it falls short. The figures come from sizing.py; this
module only keeps the books.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from colocate.config import DeploymentConfig, DeviceSpec, ServiceSpec
from colocate.memory.sizing import (ModelFootprint, ServiceDemand, runtime_overhead,
                                    service_demand)
from colocate.sizes import format_size

# Kept free when the YAML gives no `headroom`. On CUDA it absorbs allocator
# fragmentation and library workspaces (cuBLAS, NCCL) that no ledger row tracks; on
# CPU, the OS and other processes share the RAM. An estimate, like the overheads.
DEFAULT_HEADROOM = 2**30


@dataclass(frozen=True)
class LedgerRow:
    item: str
    bytes: int
    service: str | None = None   # None for device-wide rows (headroom, shared weights)


class AdmissionRefused(Exception):
    """A service whose share does not fit; `shortfall` is the missing bytes."""

    def __init__(self, device: str, demand: ServiceDemand, needed: int, free: int,
                 hint: str = ""):
        self.device, self.demand = device, demand
        self.needed, self.free = needed, free
        self.shortfall = needed - free
        super().__init__(
            f"{demand.service} does not fit on {device}: it needs {needed:,} bytes "
            f"({format_size(needed)}) but {free:,} bytes ({format_size(free)}) are free, "
            f"short by {self.shortfall:,} bytes ({format_size(self.shortfall)}){hint}")


class MemoryArbiter:
    def __init__(self, device: str, capacity: int, footprints: Mapping[str, ModelFootprint],
                 share_weights: bool = True, headroom: int | None = None,
                 fused: bool = False):
        """fused: the services of one model share one process (batching: fused), so
        they share its runtime and one activation workspace, sized for the group's
        largest step."""
        self.device = device
        self.capacity = capacity
        self.share_weights = share_weights
        self.fused = fused
        self.headroom = DEFAULT_HEADROOM if headroom is None else headroom
        # The supervisor process owns the shared weights and so has a runtime of its own.
        self.supervisor_bytes = runtime_overhead(self.is_cuda)
        self._footprints = dict(footprints)
        self._admitted: dict[str, ServiceDemand] = {}   # in admission order

    @classmethod
    def for_device(cls, gpu: DeviceSpec, config: DeploymentConfig,
                   capacity: int | None = None) -> "MemoryArbiter":
        """An arbiter for one `gpus[]` entry. Capacity: the argument, else the YAML's
        `memory`, else what the device reports."""
        if capacity is None:
            capacity = gpu.memory
        if capacity is None:
            from colocate.memory.probe import device_capacity
            capacity = device_capacity(gpu.device)
        models = {s.model for s in gpu.services}
        footprints = {name: ModelFootprint.of(config.models[name]) for name in sorted(models)}
        return cls(gpu.device, capacity, footprints, share_weights=gpu.share_weights,
                   headroom=gpu.headroom, fused=gpu.batching == "fused")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    # ---- the books -------------------------------------------------------------

    def know_model(self, model: str, footprint: ModelFootprint) -> None:
        """A model a live change brings to the device (a known one keeps its figures)."""
        self._footprints.setdefault(model, footprint)

    def footprint(self, model: str) -> ModelFootprint:
        if model not in self._footprints:
            raise KeyError(f"{self.device}: no footprint for model {model!r}")
        return self._footprints[model]

    def demand(self, service: ServiceSpec) -> ServiceDemand:
        demand = service_demand(service, self.footprint(service.model), self.is_cuda)
        group = [d for d in self._admitted.values()
                 if self.fused and d.model == demand.model and d.service != demand.service]
        if not group:
            return demand
        # A fused group's process is already booked: only a larger step than the
        # group's largest so far grows its workspace.
        booked = max(d.workspace_bytes for d in group)
        return replace(demand, workspace_bytes=max(0, demand.workspace_bytes - booked),
                       runtime_bytes=0)

    def _weights_charged_for(self, model: str) -> bool:
        """Whether admitting one more service of `model` needs a new weight copy."""
        if not self.share_weights:
            return True
        return all(d.model != model for d in self._admitted.values())

    def cost(self, service: ServiceSpec) -> int:
        """Bytes that admitting `service` now would add to the ledger."""
        d = self.demand(service)
        return d.own_bytes + (d.weight_bytes if self._weights_charged_for(d.model) else 0)

    @property
    def reserved_bytes(self) -> int:
        return sum(row.bytes for row in self.ledger())

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.reserved_bytes

    def shortfall(self, service: ServiceSpec) -> int:
        """0 if `service` fits now, else the bytes it is short by."""
        return max(0, self.cost(service) - self.free_bytes)

    def can_admit(self, service: ServiceSpec) -> bool:
        return self.shortfall(service) == 0

    def admit(self, service: ServiceSpec) -> ServiceDemand:
        """Book `service`'s share, or raise AdmissionRefused saying by how much it misses."""
        if service.name in self._admitted:
            raise ValueError(f"{service.name} is already admitted on {self.device}")
        demand = self.demand(service)
        needed, free = self.cost(service), self.free_bytes
        if needed > free:
            raise AdmissionRefused(self.device, demand, needed, free, self._hint(demand))
        self._admitted[service.name] = demand
        return demand

    def release(self, name: str) -> None:
        """Free a service's share; shared weights go with the last service using them."""
        if self._admitted.pop(name, None) is None:
            raise KeyError(f"{name} is not admitted on {self.device}")

    def admitted(self) -> list[ServiceDemand]:
        return list(self._admitted.values())

    def ledger(self) -> list[LedgerRow]:
        """What is booked, device-wide rows first, then each service's rows."""
        rows = [LedgerRow("headroom", self.headroom),
                LedgerRow("runtime overhead: supervisor process (estimate)",
                          self.supervisor_bytes)]
        if self.share_weights:
            users: dict[str, list[str]] = {}
            for d in self._admitted.values():
                users.setdefault(d.model, []).append(d.service)
            for model, services in users.items():
                fp = self._footprints[model]
                rows.append(LedgerRow(
                    f"weights {model} ({fp.describe()}, one copy shared by "
                    f"{len(services)} service{'s' if len(services) > 1 else ''})",
                    fp.weight_bytes()))
        for d in self._admitted.values():
            if not self.share_weights:
                rows.append(LedgerRow(
                    f"{d.service}: weights {d.model} ({self._footprints[d.model].describe()},"
                    f" own copy)", d.weight_bytes, d.service))
            rows += [
                LedgerRow(f"{d.service}: KV cache ({d.kv_dtype}, {d.kv_tokens:,} tokens)",
                          d.kv_bytes, d.service),
                LedgerRow(f"{d.service}: activation workspace (estimate)",
                          d.workspace_bytes, d.service),
                LedgerRow(f"{d.service}: runtime overhead (estimate)",
                          d.runtime_bytes, d.service),
            ]
        return rows

    def _hint(self, demand: ServiceDemand) -> str:
        """Why it did not fit, when one line can say something useful."""
        copies = sum(d.model == demand.model for d in self._admitted.values())
        if self.share_weights or copies == 0:
            return ""
        return (f"; share_weights is false, so its {format_size(demand.weight_bytes)} of "
                f"{demand.model} weights would be copy number {copies + 1} on this device "
                f"(with share_weights: true they are counted once)")
