"""Engine statistics: plain counters and fixed-bucket latency histograms.

The engine loop fills an EngineStatistics as it works; anyone may take a
StatisticsSnapshot of it at any time (the metrics exporter does so at scrape time).
Everything is cumulative and bounded: a histogram is a fixed list of bucket counts,
never a list of observations, so an engine that runs for months holds the same few
hundred integers it started with.

Only the loop thread writes. Readers copy without a lock: in CPython, copying a list
or a dict of ints is one C call under the GIL, so a copied bucket list is never torn,
and a histogram's count is derived from its buckets, so count and +Inf always agree.
The only skew a reader can see is a sum one observation ahead of its buckets, which
Prometheus tolerates. This keeps the batch-1 decode path free of locks.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Bucket upper bounds, in seconds. Chosen to resolve both a CPU tiny model (tens of
# milliseconds per token) and a 13B model on a shared GPU under load (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                       0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
# Waking a sleeping service: a pool of a few MiB on a CPU up to tens of GiB on a GPU.
WAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]      # upper bounds, ascending; +Inf is implied
    counts: tuple[int, ...]        # per bucket, NOT cumulative; len(bounds) + 1
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) per bucket, ending with +Inf, as
        Prometheus exposes them."""
        out, running = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            running += n
            out.append((bound, running))
        return out


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"histogram bounds must be strictly ascending: {self.bounds}")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left puts a value equal
        # to a bound into that bound's bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        counts = tuple(self.counts)          # one atomic copy; see the module note
        return HistogramSnapshot(self.bounds, counts, self.sum)


@dataclass(frozen=True)
class StatisticsSnapshot:
    """One engine's statistics at one moment; picklable, so it can cross Ray."""
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0           # usable blocks (the null block excluded)
    kv_blocks_lent: int = 0            # of the used ones, held by other members' requests
    kv_blocks_borrowed: int = 0        # other members' blocks its requests hold
    block_size: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0      # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0         # of those, tokens found
    finished: dict[str, int] = field(default_factory=dict)   # finish reason -> requests
    ttft: HistogramSnapshot | None = None
    inter_token: HistogramSnapshot | None = None
    e2e: HistogramSnapshot | None = None
    queue_time: HistogramSnapshot | None = None
    sleeping: bool = False             # the KV pool is given back until the next request
    wake: HistogramSnapshot | None = None   # seconds each wake took to take the pool back

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks_total * self.block_size


@dataclass
class EngineStatistics:
    """What the engine records per token and per finished request.

    Preemptions, prefix-cache lookups and the load gauges are not kept here: the
    scheduler and the KV manager already count them, and snapshot() reads them."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    inter_token: Histogram = field(default_factory=lambda: Histogram(INTER_TOKEN_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    queue_time: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    wake: Histogram = field(default_factory=lambda: Histogram(WAKE_BUCKETS))

    def on_token(self, request, now: float) -> None:
        """A request produced an output token at `now` (time.monotonic())."""
        if request.first_token_time is None:
            request.first_token_time = now
            # The prompt is done once the first token exists; counted once per
            # request, however often a preemption made the engine recompute it.
            self.prompt_tokens += request.num_prompt_tokens
            self.ttft.observe(now - request.arrival_time)
            if request.first_scheduled_time is not None:
                self.queue_time.observe(request.first_scheduled_time - request.arrival_time)
        else:
            self.inter_token.observe(now - request.last_token_time)
        request.last_token_time = now
        self.generation_tokens += 1

    def on_finish(self, request, now: float) -> None:
        reason = str(request.finish_reason)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.e2e.observe(now - request.arrival_time)
