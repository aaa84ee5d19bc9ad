"""The device's side of a sample: the ledger split by holder and kind, weight copies,
and memory measured for processes that exist (and not for those that do not)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from colocate.config import load_config
from colocate.memory.arbiter import MemoryArbiter
from colocate.metrics.device import (device_sample, ledger_reservations, measured_memory,
                                     weight_copies)
from colocate.metrics.samples import DEVICE, ServiceReport
from tests.metrics.fixtures import stats

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "cpu-3x-smollm2.yaml"


def admitted(share_weights: bool):
    config = load_config(EXAMPLE, check_env=False)
    gpu = dataclasses.replace(config.gpus[0], share_weights=share_weights)
    arbiter = MemoryArbiter.for_device(gpu, config, capacity=64 * 2**30)
    for service in gpu.services:
        arbiter.admit(service)
    return config, gpu, arbiter


@pytest.mark.parametrize("share_weights", [True, False])
def test_reservations_add_up_to_the_ledger(share_weights):
    _, gpu, arbiter = admitted(share_weights)
    rows = ledger_reservations(arbiter)
    assert sum(r.bytes for r in rows) == arbiter.reserved_bytes
    for service in gpu.services:
        mine = {r.kind for r in rows if r.service == service.name}
        assert mine == ({"kv_cache", "workspace", "runtime"}
                        | (set() if share_weights else {"weights"}))
    device_weights = [r for r in rows if r.service == DEVICE and r.kind == "weights"]
    assert len(device_weights) == (1 if share_weights else 0)


class FakeStore:
    def __init__(self, copies: dict[str, int]):
        self.copies = copies

    def models(self):
        return list(self.copies)

    def bytes_of(self, name):
        return self.copies[name]


def test_unshared_copies_are_labelled_with_their_service():
    copies = weight_copies(FakeStore({"small": 10, "small@small-b": 20}))
    assert [(c.service, c.model, c.bytes) for c in copies] == [
        (DEVICE, "small", 10), ("small-b", "small", 20)]


def test_a_gone_process_is_left_out():
    memory = measured_memory("cpu", [os.getpid(), 2**22 + 12345])
    assert list(memory) == [os.getpid()] and memory[os.getpid()] > 0


def test_sample_joins_reports_with_the_ledger():
    config, gpu, arbiter = admitted(True)
    report = ServiceReport(pid=os.getpid(), dtype="float32", stats=stats())
    sample = device_sample(gpu, config, arbiter, FakeStore({"smollm2": 10}), "cpu",
                           {"chat-b": (report, 2)})
    (service,) = sample.services          # only the one that answered
    demand = next(d for d in arbiter.admitted() if d.service == "chat-b")
    assert (service.name, service.restarts) == ("chat-b", 2)
    assert service.kv_budget_bytes == demand.kv_bytes
    assert service.kv_dtype == "float32" and service.quantization == "int4"   # Q4_1 as stored
    assert service.memory_used_bytes == sample.supervisor_memory_bytes > 0
    assert sample.capacity_bytes == 64 * 2**30
