"""What `colocate top` shows: devices and services computed from /metrics scrapes.

Pure functions over scrapes (no terminal, no HTTP), so they are tested directly:
  - a Scrape is one parse of a device's /metrics text, with the time it was taken;
  - rates (tokens/s) come from the oldest and newest scrape in the window, and
    latency quantiles from the histogram buckets' growth over the window, the way
    Prometheus' histogram_quantile(rate(...[1m])) reads them;
  - render() lays the rows out in at most 80 columns.
colocate/top.py fetches the scrapes and runs the terminal.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from colocate.sizes import format_size

DEVICE = "_device"          # the service label of device-wide series
WINDOW_S = 60.0
Key = tuple[str, frozenset]


@dataclass(frozen=True)
class Scrape:
    time: float
    url: str
    samples: dict[Key, float]

    def value(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def label_values(self, name: str, label: str) -> list[str]:
        return sorted({dict(ls)[label] for (n, ls), _ in self.samples.items()
                       if n == name and label in dict(ls)})


def parse(text: str, url: str, now: float) -> Scrape:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(now, url, samples)


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """q-quantile of cumulative (upper bound, count) buckets, linearly interpolated
    inside the bucket (as Prometheus does); None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width
                                                          if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def _bucket_growth(new: Scrape, old: Scrape | None, name: str,
                   service: str) -> list[tuple[float, float]]:
    out = []
    for (n, ls), v in new.samples.items():
        labels = dict(ls)
        if n == f"{name}_bucket" and labels.get("service") == service:
            before = old.samples.get((n, ls), 0.0) if old is not None else 0.0
            out.append((float(labels["le"]), v - before))
    return out


@dataclass(frozen=True)
class ServiceRow:
    device: str
    service: str
    running: int
    waiting: int
    kv_used: int
    kv_total: int
    tokens_in_per_s: float | None
    tokens_out_per_s: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p99: float | None
    finished: int
    refused: int
    restarts: int
    state: str = "serving"     # serving | sleeping | draining | restarting | failed


@dataclass(frozen=True)
class DeviceRow:
    device: str
    url: str
    capacity: float
    weights: float
    kv_budgets: float
    reserved: float


def services(history: Sequence[Scrape]) -> list[ServiceRow]:
    """One row per service of the newest scrape; rates and quantiles over the window
    (None until two scrapes are WINDOW_S or less apart)."""
    new = history[-1]
    in_window = [s for s in history[:-1] if new.time - s.time <= WINDOW_S]
    old = in_window[0] if in_window else None
    span = new.time - old.time if old is not None else 0.0
    rows = []
    for device, name in _listed(new):

            def rate(metric):
                if old is None or span <= 0:
                    return None
                return (new.value(metric, service=name)
                        - old.value(metric, service=name)) / span

            def quantiles(metric):
                growth = _bucket_growth(new, old, metric, name)
                return _quantile(0.5, growth), _quantile(0.99, growth)

            ttft = quantiles("colocate_time_to_first_token_seconds")
            itl = quantiles("colocate_inter_token_latency_seconds")
            rows.append(ServiceRow(
                device=device, service=name,
                running=int(new.value("colocate_requests_running", service=name)),
                waiting=int(new.value("colocate_requests_waiting", service=name)),
                kv_used=int(new.value("colocate_kv_cache_blocks_used", service=name)),
                kv_total=int(new.value("colocate_kv_cache_blocks_capacity", service=name)),
                tokens_in_per_s=rate("colocate_prompt_tokens_total"),
                tokens_out_per_s=rate("colocate_generation_tokens_total"),
                ttft_p50=ttft[0], ttft_p99=ttft[1], itl_p50=itl[0], itl_p99=itl[1],
                finished=int(new.value("colocate_requests_finished_total", service=name)),
                refused=int(new.value("colocate_requests_rejected_total", service=name)),
                restarts=int(new.value("colocate_service_restarts_total", service=name)),
                state=state_of(new, name)))
    return rows


def _listed(scrape: Scrape) -> list[tuple[str, str]]:
    """(device, service) of every service the scrape knows: those that answered it
    (colocate_service_info) and those whose supervisor only reports a state (one
    restarting or draining does not answer)."""
    found = set()
    for name in ("colocate_service_info", "colocate_service_state"):
        found |= {(dict(ls)["gpu"], dict(ls)["service"]) for (n, ls), v in scrape.samples.items()
                  if n == name and v}
    return sorted(found)


def state_of(scrape: Scrape, service: str) -> str:
    """sleeping when colocate_service_sleeping says so (a service put to sleep still
    answers), else the supervisor's colocate_service_state; serving when neither is
    exported (an older colocate)."""
    if scrape.value("colocate_service_sleeping", service=service):
        return "sleeping"
    for (n, ls), v in scrape.samples.items():
        labels = dict(ls)
        if n == "colocate_service_state" and labels.get("service") == service and v:
            return labels["state"]
    return "serving"


def devices(scrape: Scrape) -> list[DeviceRow]:
    return [DeviceRow(
        device=gpu, url=scrape.url,
        capacity=scrape.value("colocate_device_memory_capacity_bytes", gpu=gpu),
        weights=scrape.value("colocate_memory_reserved_bytes", gpu=gpu, kind="weights"),
        kv_budgets=scrape.value("colocate_memory_reserved_bytes", gpu=gpu, kind="kv_cache"),
        reserved=scrape.value("colocate_memory_reserved_bytes", gpu=gpu))
        for gpu in scrape.label_values("colocate_device_memory_capacity_bytes", "gpu")]


SORT_KEYS = {"name": lambda r: (r.device, r.service), "running": lambda r: -r.running,
             "waiting": lambda r: -r.waiting, "tokens": lambda r: -(r.tokens_out_per_s or 0)}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _per_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(device_rows: Sequence[DeviceRow], rows: Sequence[ServiceRow], sort: str = "name",
           width: int = 80, note: str = "") -> list[str]:
    """The screen, one string per line, none wider than `width`."""
    lines = [f"colocate top  sort: {sort} (s: next, q: quit)  {note}".rstrip()]
    for d in device_rows:
        free = d.capacity - d.reserved
        lines.append(f"{d.device}  capacity {format_size(int(d.capacity))}  weights "
                     f"{format_size(int(d.weights))}  KV budgets {format_size(int(d.kv_budgets))}"
                     f"  free {format_size(int(max(free, 0)))}")
    lines.append("")
    # 80 columns: latencies are p50/p99 in ms.
    header = (f"{'SERVICE':<10}{'STATE':<10}{'RUN':>4}{'WAIT':>5}{'KV':>9}{'IN/s':>6}"
              f"{'OUT/s':>6}{'TTFT 50/99':>11}{'ITL 50/99':>10}{'DONE':>5}{'REF':>4}")
    lines.append(header)
    for r in sorted(rows, key=SORT_KEYS[sort]):
        kv = f"{r.kv_used}/{r.kv_total}"
        lines.append(f"{r.service[:9]:<10}{r.state[:10]:<10}{r.running:>4}{r.waiting:>5}"
                     f"{kv:>9}{_per_s(r.tokens_in_per_s):>6}{_per_s(r.tokens_out_per_s):>6}"
                     f"{_ms(r.ttft_p50) + '/' + _ms(r.ttft_p99):>11}"
                     f"{_ms(r.itl_p50) + '/' + _ms(r.itl_p99):>10}{r.finished:>5}{r.refused:>4}")
    return [line[:width] for line in lines]
