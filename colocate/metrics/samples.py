"""What a supervisor gathers at scrape time: plain, picklable dataclasses.

A service reports what only it knows (its engine's statistics and its rejections);
the supervisor adds what only it knows (the ledger, the weight store, memory measured
from outside, restarts) and hands one DeviceSample to the exporter. Nothing here
imports prometheus_client, so service processes never load it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from colocate.engine.stats import StatisticsSnapshot

# The `service` label of series that belong to the device rather than one service:
# its capacity, the supervisor process, shared weights, headroom.
DEVICE = "_device"


@dataclass(frozen=True)
class ServiceReport:
    """A service's answer to a scrape."""
    pid: int
    dtype: str                     # the weights' dtype as loaded ("auto" resolved)
    stats: StatisticsSnapshot
    rejected: dict[str, int] = field(default_factory=dict)   # reason -> requests


@dataclass(frozen=True)
class ServiceSample:
    name: str
    model: str
    dtype: str
    quantization: str              # "none" when unquantized
    kv_dtype: str                  # resolved: never "auto"
    kv_budget_bytes: int           # as the ledger charges it
    restarts: int
    report: ServiceReport
    memory_used_bytes: int = 0     # measured: PSS on CPU, NVML on CUDA


@dataclass(frozen=True)
class Reservation:
    """One slice of the ledger: who (`service`, or DEVICE) holds it, and what for."""
    service: str
    kind: str                      # weights | kv_cache | workspace | runtime | headroom
    bytes: int


@dataclass(frozen=True)
class WeightCopy:
    """One published copy in the weight store; `service` is DEVICE when shared."""
    service: str
    model: str
    bytes: int


@dataclass(frozen=True)
class DeviceSample:
    gpu: str                       # the YAML's device name, e.g. "cuda:0"
    version: str                   # colocate's
    capacity_bytes: int
    supervisor_memory_bytes: int   # measured, like the services'
    services: tuple[ServiceSample, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    weights: tuple[WeightCopy, ...] = ()
    replacements: int = 0          # times this device entry was re-placed after a lost node
    states: tuple[tuple[str, str], ...] = ()   # (service, one of SERVICE_STATES), every slot


# What colocate_service_state says of a service (its supervisor's slot state, named
# for the operator): answering; being replaced; finishing its requests before a stop;
# down after a refused or failed start.
SERVICE_STATES = ("serving", "restarting", "draining", "failed")
SLOT_STATES = {"running": "serving", "starting": "restarting", "restarting": "restarting",
               "draining": "draining", "failed": "failed"}
