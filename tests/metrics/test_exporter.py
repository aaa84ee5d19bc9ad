"""The exporter against hand-made samples: names, labels, values, the endpoint."""
from __future__ import annotations

import dataclasses
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from colocate.metrics.catalog import CATALOG, sample_names
from colocate.metrics.endpoint import MetricsEndpoint
from colocate.metrics.exporter import DeviceCollector
from colocate.metrics.rejections import REJECT_REASONS, RejectionCounter
from colocate.metrics.samples import DEVICE, SERVICE_STATES
from colocate.service.grpc_server import rejection_reason
from tests.metrics import fixtures


def scrape(sample) -> dict[tuple[str, frozenset], float]:
    """(series name, labels) -> value, through the text format Prometheus reads."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeviceCollector(lambda: sample))
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(series, name, **labels):
    return series[(name, frozenset(labels.items()))]


def test_every_catalog_series_is_produced_and_nothing_else():
    series = scrape(fixtures.device("a", "b"))
    assert {name for name, _ in series} == sample_names()


def test_every_series_carries_gpu_and_service():
    for name, labels in scrape(fixtures.device("a")):
        keys = dict(labels)
        assert keys["gpu"] == "cpu" and keys["service"], name


def test_service_values():
    s = scrape(fixtures.device("a", "b"))
    key = dict(gpu="cpu", service="b")
    assert value(s, "colocate_time_to_first_token_seconds_count", **key) == 3
    assert value(s, "colocate_time_to_first_token_seconds_bucket", le="0.1", **key) == 2
    assert value(s, "colocate_time_to_first_token_seconds_bucket", le="+Inf", **key) == 3
    assert value(s, "colocate_time_to_first_token_seconds_sum", **key) == pytest.approx(3.15)
    assert value(s, "colocate_inter_token_latency_seconds_count", **key) == 9
    assert value(s, "colocate_kv_cache_blocks_used", **key) == 5
    assert value(s, "colocate_kv_cache_blocks_capacity", **key) == 16
    assert value(s, "colocate_kv_cache_capacity_tokens", **key) == 256
    assert value(s, "colocate_kv_cache_budget_bytes", **key) == 4096
    assert value(s, "colocate_service_sleeping", **key) == 1
    assert value(s, "colocate_service_wake_seconds_bucket", le="0.025", **key) == 1
    assert value(s, "colocate_generation_tokens_total", **key) == 12
    assert value(s, "colocate_prefix_cache_hit_tokens_total", **key) == 16
    assert value(s, "colocate_memory_used_bytes", **key) == 123
    assert value(s, "colocate_service_info", model="m", dtype="float32", quantization="none",
                 kv_dtype="float32", **key) == 1


def test_every_reason_is_exported_zeros_included():
    s = scrape(fixtures.device("a"))
    key = dict(gpu="cpu", service="a")
    finished = {r: value(s, "colocate_requests_finished_total", reason=r, **key)
                for r in ("stop", "length", "abort")}
    assert finished == {"stop": 0, "length": 2, "abort": 1}
    rejected = {r: value(s, "colocate_requests_rejected_total", reason=r, **key)
                for r in REJECT_REASONS}
    assert rejected == {"auth": 2, "invalid": 0, "too_long": 1, "overloaded": 0}


def test_device_series():
    s = scrape(fixtures.device("a"))
    dev = dict(gpu="cpu", service=DEVICE)
    assert value(s, "colocate_build_info", version="9.9.9", **dev) == 1
    assert value(s, "colocate_device_memory_capacity_bytes", **dev) == 2**34
    assert value(s, "colocate_memory_used_bytes", **dev) == 77
    assert value(s, "colocate_device_replacements_total", **dev) == 0
    assert value(s, "colocate_weight_store_bytes", model="m", **dev) == 100
    assert value(s, "colocate_memory_reserved_bytes", kind="headroom", **dev) == 10
    assert value(s, "colocate_memory_reserved_bytes", gpu="cpu", service="a",
                 kind="kv_cache") == 4096


def test_a_device_without_services_still_reports_its_memory():
    names = {name for name, _ in scrape(fixtures.device())}
    assert "colocate_device_memory_capacity_bytes" in names
    assert "colocate_requests_running" not in names


def test_catalog_names_follow_prometheus_conventions():
    for spec in CATALOG:
        assert spec.name.startswith("colocate_")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds")


def test_rejection_reasons_of_errors():
    from colocate.engine.engine import PromptTooLongError
    from colocate.service.engine_protocol import EngineDeadError, QueueFullError

    assert rejection_reason(PromptTooLongError("x")) == "too_long"
    assert rejection_reason(ValueError("x")) == "invalid"
    assert rejection_reason(QueueFullError("x")) == "overloaded"
    assert rejection_reason(EngineDeadError("x")) is None
    counter = RejectionCounter()
    counter.add("auth")
    assert counter.counts() == {"auth": 1, "invalid": 0, "too_long": 0, "overloaded": 0}
    with pytest.raises(ValueError):
        counter.add("bored")


def test_endpoint_serves_and_frees_its_port():
    endpoint = MetricsEndpoint(lambda: fixtures.device("a"), "127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(endpoint.url, timeout=10).read().decode()
    finally:
        endpoint.stop()
    assert 'colocate_requests_running{gpu="cpu",service="a"} 2.0' in body
    with socket.socket() as s:            # the port is free again (no listener on it)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", endpoint.port))


def test_a_replaced_device_entry_says_so():
    sample = dataclasses.replace(fixtures.device("a"), replacements=2)
    assert value(scrape(sample), "colocate_device_replacements_total",
                 gpu="cpu", service=DEVICE) == 2


def test_service_state_is_one_for_the_current_state_only():
    sample = dataclasses.replace(fixtures.device("a", "b"),
                                 states=(("a", "serving"), ("b", "restarting")))
    states = {(dict(labels)["service"], dict(labels)["state"]): v
              for (name, labels), v in scrape(sample).items()
              if name == "colocate_service_state"}
    assert {k for k, v in states.items() if v == 1} == {("a", "serving"), ("b", "restarting")}
    assert len(states) == 2 * len(SERVICE_STATES)
