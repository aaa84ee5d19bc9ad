"""DeviceSample -> Prometheus metric families, and the Collector that scrapes them.

The collector asks its `gather` callable for a fresh DeviceSample on every scrape, so
the numbers are read when Prometheus asks and nothing is kept in between.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from colocate.engine.stats import HistogramSnapshot
from colocate.metrics.catalog import CATALOG, MetricSpec
from colocate.metrics.rejections import REJECT_REASONS
from colocate.metrics.samples import DEVICE, SERVICE_STATES, DeviceSample, ServiceSample

_FAMILY = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
           "histogram": HistogramMetricFamily}

# stats field -> histogram name
_HISTOGRAMS = (
    ("ttft", "colocate_time_to_first_token_seconds"),
    ("inter_token", "colocate_inter_token_latency_seconds"),
    ("e2e", "colocate_e2e_request_latency_seconds"),
    ("queue_time", "colocate_request_queue_time_seconds"),
    ("wake", "colocate_service_wake_seconds"),
)


class _Families:
    """One family per catalog entry; `add` checks the labels against the catalog."""

    def __init__(self, specs: tuple[MetricSpec, ...] = CATALOG) -> None:
        self._specs = {s.name: s for s in specs}
        self._families = {s.name: _FAMILY[s.kind](s.name, s.help, labels=s.all_labels)
                          for s in specs}

    def add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._check(name, labels)
        self._families[name].add_metric(labels, value)

    def add_histogram(self, name: str, labels: tuple[str, ...], h: HistogramSnapshot) -> None:
        self._check(name, labels)
        buckets = [(floatToGoString(bound), n) for bound, n in h.cumulative()]
        self._families[name].add_metric(labels, buckets, h.sum)

    def _check(self, name: str, labels: tuple[str, ...]) -> None:
        if len(labels) != len(self._specs[name].all_labels):
            raise ValueError(f"{name}: {len(labels)} label values for "
                             f"{self._specs[name].all_labels}")

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def families(sample: DeviceSample) -> list[Metric]:
    """Every series of one device and its services."""
    out = _Families()
    gpu = sample.gpu
    out.add("colocate_build_info", (gpu, DEVICE, sample.version), 1)
    out.add("colocate_device_memory_capacity_bytes", (gpu, DEVICE), sample.capacity_bytes)
    out.add("colocate_memory_used_bytes", (gpu, DEVICE), sample.supervisor_memory_bytes)
    out.add("colocate_device_replacements_total", (gpu, DEVICE), sample.replacements)
    for w in sample.weights:
        out.add("colocate_weight_store_bytes", (gpu, w.service, w.model), w.bytes)
    for r in sample.reservations:
        out.add("colocate_memory_reserved_bytes", (gpu, r.service, r.kind), r.bytes)
    for service in sample.services:
        _add_service(out, gpu, service)
    for service, state in sample.states:
        for each in SERVICE_STATES:
            out.add("colocate_service_state", (gpu, service, each), float(each == state))
    return list(out)


def _add_service(out: _Families, gpu: str, s: ServiceSample) -> None:
    key = (gpu, s.name)
    st = s.report.stats
    out.add("colocate_service_info", key + (s.model, s.dtype, s.quantization, s.kv_dtype), 1)
    out.add("colocate_memory_used_bytes", key, s.memory_used_bytes)
    out.add("colocate_service_restarts_total", key, s.restarts)
    out.add("colocate_kv_cache_budget_bytes", key, s.kv_budget_bytes)
    for name, value in (
            ("colocate_requests_running", st.num_running),
            ("colocate_requests_waiting", st.num_waiting),
            ("colocate_kv_cache_blocks_used", st.kv_blocks_used),
            ("colocate_kv_cache_blocks_capacity", st.kv_blocks_total),
            ("colocate_kv_cache_blocks_lent", st.kv_blocks_lent),
            ("colocate_kv_cache_blocks_borrowed", st.kv_blocks_borrowed),
            ("colocate_kv_cache_capacity_tokens", st.kv_capacity_tokens),
            ("colocate_service_sleeping", int(st.sleeping)),
            ("colocate_prompt_tokens_total", st.prompt_tokens),
            ("colocate_generation_tokens_total", st.generation_tokens),
            ("colocate_preemptions_total", st.preemptions),
            ("colocate_prefix_cache_queried_tokens_total", st.prefix_cache_queries),
            ("colocate_prefix_cache_hit_tokens_total", st.prefix_cache_hits)):
        out.add(name, key, value)
    # Every known reason, zeros included: rate() needs the series before the first event.
    finished = {"stop": 0, "length": 0, "abort": 0, **st.finished}
    for reason, n in sorted(finished.items()):
        out.add("colocate_requests_finished_total", key + (reason,), n)
    rejected = {**dict.fromkeys(REJECT_REASONS, 0), **s.report.rejected}
    for reason, n in sorted(rejected.items()):
        out.add("colocate_requests_rejected_total", key + (reason,), n)
    for field, name in _HISTOGRAMS:
        h = getattr(st, field)
        if h is not None:
            out.add_histogram(name, key, h)


class DeviceCollector(Collector):
    """A prometheus_client Collector over `gather() -> DeviceSample`."""

    def __init__(self, gather: Callable[[], DeviceSample]) -> None:
        self._gather = gather

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._gather()))

    def describe(self) -> list[Metric]:
        # Registering must not trigger a scrape (it would call the services).
        return []
