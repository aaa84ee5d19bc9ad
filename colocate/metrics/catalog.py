"""Every series colocate exports: name, type, help and labels, in one list.

The exporter builds its families from this list and nothing else, and the dashboard
test checks the Grafana queries against it, so a renamed series cannot go unnoticed.
Names follow Prometheus conventions: a `colocate_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters and on counters only.
"""
from __future__ import annotations

from dataclasses import dataclass

# Every series carries these; per-request labels are never added (unbounded series).
BASE_LABELS = ("gpu", "service")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                       # gauge | counter | histogram
    help: str
    labels: tuple[str, ...] = ()    # beyond BASE_LABELS

    @property
    def all_labels(self) -> tuple[str, ...]:
        return BASE_LABELS + self.labels

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names Prometheus stores for this metric."""
        if self.kind == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


def _spec(name: str, kind: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, kind, help, labels)


CATALOG: tuple[MetricSpec, ...] = (
    # ---- latency, per service ----
    _spec("colocate_time_to_first_token_seconds", "histogram",
          "Time from a request's arrival at the engine to its first output token."),
    _spec("colocate_inter_token_latency_seconds", "histogram",
          "Time between consecutive output tokens of a request."),
    _spec("colocate_e2e_request_latency_seconds", "histogram",
          "Time from a request's arrival to its end (any finish reason)."),
    _spec("colocate_request_queue_time_seconds", "histogram",
          "Time a request waited before the scheduler first ran it."),
    # ---- load and KV pool, per service ----
    _spec("colocate_requests_running", "gauge", "Requests the scheduler is running."),
    _spec("colocate_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    _spec("colocate_kv_cache_blocks_used", "gauge",
          "KV-cache blocks of the pool held by requests (lent ones included)."),
    _spec("colocate_kv_cache_blocks_lent", "gauge",
          "Blocks of the pool that other services of its fused group or isolated "
          "lending circle hold now (kv_cache.lend), taken back when it needs them."),
    _spec("colocate_kv_cache_blocks_borrowed", "gauge",
          "Blocks of lending services of its fused group or lending circle that its "
          "requests hold now."),
    _spec("colocate_kv_cache_blocks_capacity", "gauge", "Usable KV-cache blocks in the pool."),
    _spec("colocate_kv_cache_budget_bytes", "gauge",
          "The service's KV-cache budget as the memory arbiter charges it."),
    _spec("colocate_kv_cache_capacity_tokens", "gauge", "Tokens the KV-cache pool can hold."),
    _spec("colocate_service_sleeping", "gauge",
          "1 while the service sleeps (sleep_after_idle: its KV pool given back, its "
          "budget still booked), else 0."),
    _spec("colocate_service_wake_seconds", "histogram",
          "Time a sleeping service took to take its KV pool back on its next request "
          "(that request's extra latency)."),
    # ---- work done, per service ----
    _spec("colocate_prompt_tokens_total", "counter",
          "Prompt tokens processed (once per request, recomputation not counted)."),
    _spec("colocate_generation_tokens_total", "counter", "Output tokens generated."),
    _spec("colocate_requests_finished_total", "counter",
          "Requests that ended, by finish reason (stop, length, abort).", "reason"),
    _spec("colocate_requests_rejected_total", "counter",
          "Requests refused before they ran, by reason "
          "(auth, invalid, too_long, overloaded).", "reason"),
    _spec("colocate_preemptions_total", "counter",
          "Requests preempted (KV blocks freed, to be recomputed)."),
    _spec("colocate_prefix_cache_queried_tokens_total", "counter",
          "Prompt tokens looked up in the prefix cache at admission."),
    _spec("colocate_prefix_cache_hit_tokens_total", "counter",
          "Prompt tokens found in the prefix cache at admission."),
    _spec("colocate_service_restarts_total", "counter",
          "Times the supervisor restarted the service."),
    _spec("colocate_device_replacements_total", "counter",
          "Times this device entry was re-placed on another node after its node was lost "
          "(restart: anywhere); service=\"_device\"."),
    # ---- memory, per device ----
    _spec("colocate_device_memory_capacity_bytes", "gauge",
          "Device memory the arbiter plans with (the YAML's, else what the device reports)."),
    _spec("colocate_memory_used_bytes", "gauge",
          "Memory measured per process: PSS on CPU, NVML on CUDA. "
          "service=\"_device\" is the supervisor, which holds the shared weights."),
    _spec("colocate_weight_store_bytes", "gauge",
          "Bytes of one published weight copy (service=\"_device\" when shared).", "model"),
    _spec("colocate_memory_reserved_bytes", "gauge",
          "Bytes booked in the arbiter's ledger, by holder and kind "
          "(weights, kv_cache, workspace, runtime, headroom).", "kind"),
    # ---- what is running ----
    _spec("colocate_build_info", "gauge", "Always 1; the colocate version.", "version"),
    _spec("colocate_service_info", "gauge", "Always 1; what the service serves.",
          "model", "dtype", "quantization", "kv_dtype"),
    _spec("colocate_service_state", "gauge",
          "1 for the service's state as its supervisor sees it, 0 for the others "
          "(serving, restarting, draining, failed).", "state"),
)

BY_NAME = {spec.name: spec for spec in CATALOG}


def sample_names() -> set[str]:
    """Every series name a scrape can return."""
    return {n for spec in CATALOG for n in spec.sample_names}
