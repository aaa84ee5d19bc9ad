"""Samples with every series populated, for the exporter and dashboard tests."""
from __future__ import annotations

from colocate.engine.stats import (INTER_TOKEN_BUCKETS, REQUEST_BUCKETS, TTFT_BUCKETS,
                                   WAKE_BUCKETS, Histogram, StatisticsSnapshot)
from colocate.metrics.samples import (DEVICE, DeviceSample, Reservation, ServiceReport,
                                      ServiceSample, WeightCopy)


def histogram(bounds, values) -> Histogram:
    h = Histogram(bounds)
    for v in values:
        h.observe(v)
    return h


def stats(**overrides) -> StatisticsSnapshot:
    fields = dict(
        num_running=2, num_waiting=1, kv_blocks_used=5, kv_blocks_total=16, block_size=16,
        prompt_tokens=30, generation_tokens=12, preemptions=1, prefix_cache_queries=30,
        prefix_cache_hits=16, finished={"length": 2, "abort": 1},
        ttft=histogram(TTFT_BUCKETS, [0.05, 0.1, 3.0]).snapshot(),
        inter_token=histogram(INTER_TOKEN_BUCKETS, [0.02] * 9).snapshot(),
        e2e=histogram(REQUEST_BUCKETS, [0.3, 0.4, 9.0]).snapshot(),
        queue_time=histogram(REQUEST_BUCKETS, [0.0, 0.0, 0.2]).snapshot(),
        sleeping=True, wake=histogram(WAKE_BUCKETS, [0.02]).snapshot())
    return StatisticsSnapshot(**{**fields, **overrides})


def service(name: str, **stat_overrides) -> ServiceSample:
    report = ServiceReport(pid=1000, dtype="float32", stats=stats(**stat_overrides),
                           rejected={"auth": 2, "too_long": 1})
    return ServiceSample(name=name, model="m", dtype="float32", quantization="none",
                         kv_dtype="float32", kv_budget_bytes=4096, restarts=0,
                         report=report, memory_used_bytes=123)


def device(*names: str) -> DeviceSample:
    return DeviceSample(
        gpu="cpu", version="9.9.9", capacity_bytes=2**34, supervisor_memory_bytes=77,
        services=tuple(service(n) for n in names),
        reservations=(Reservation(DEVICE, "headroom", 10), Reservation(DEVICE, "weights", 100))
        + tuple(Reservation(n, "kv_cache", 4096) for n in names),
        weights=(WeightCopy(DEVICE, "m", 100),),
        states=tuple((n, "serving") for n in names))
