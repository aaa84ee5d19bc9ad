"""The bursty load of bench/colocation.py (`--bursty`): services alternately busy and idle.

The N services of the config's first device entry take turns: service i is busy for
`--burst` seconds (`--burst-concurrency` requests in flight, back to back), then idle
while the others take theirs, for `--cycles` rounds. The same turns run against each
deployment of `--bursty-scenarios`:

  static  the budgets as configured, isolated: every pool held for the whole run;
  sleep   isolated, every service with `sleep_after_idle: --sleep-after`, so an idle
          one gives its KV pool back and the first request of its next burst wakes it;
  lend    `batching: fused`, the first service borrowing and every other one lending
          (`kv_cache: {lend: true}`): while a lender idles, the first service's burst
          may overflow its own pool into the lenders' free blocks, and a lender's
          burst takes them back. A lender does not borrow (colocate/engine/
          kv_lending.py), so only the first service's bursts can gain; and the
          scenario differs from `static` in batching too (one process, one batch).
  lend-isolated  the same lending between isolated processes (one pool file shared
          by all, colocate/engine/shared_lending.py): lending alone against `static`,
          with batching unchanged; a lender takes its blocks back at the borrower's
          next step rather than in its own.

Reported per scenario: TTFT p50/p99 of every request, of each burst's first request
(the one that pays for a wake) and per service, memory sampled every `--sample`
seconds (the services' and supervisor's PSS, the machine's MemAvailable, and the KV
blocks on loan, from GetStats), and the wakes the services counted in
`colocate_service_wake_seconds`: how many, their mean, and p50/p99 interpolated within
its buckets as Prometheus' histogram_quantile does. Asserts nothing.
"""
from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import replace

import psutil

from colocation_load import LoadSpec, RequestRecord, planned_request, send

SCENARIOS = ("static", "sleep", "lend", "lend-isolated")
WAKE_SERIES = "colocate_service_wake_seconds"


def scenario_config(config, name: str, sleep_after_s: float):
    """static: the config's first entry as it is; sleep: every service sleeps when idle;
    lend: fused, the first service borrowing from all the others; lend-isolated: the
    same lending, isolated."""
    gpu = replace(config.gpus[0], metrics_port=None, batching="isolated")
    if name == "sleep":
        gpu = replace(gpu, services=tuple(replace(s, sleep_after_idle=sleep_after_s)
                                          for s in gpu.services))
    elif name in ("lend", "lend-isolated"):
        first, *others = gpu.services
        gpu = replace(gpu, batching="fused" if name == "lend" else "isolated",
                      share_weights=True, services=(first, *(
                          replace(s, kv_cache=replace(s.kv_cache, lend=True)) for s in others)))
    return replace(config, gpus=(gpu,))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class MemorySampler:
    """Samples the servers' memory and the machine's available memory in a thread."""

    def __init__(self, servers, period_s: float) -> None:
        self.servers, self.period_s = servers, period_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.period_s):
            (device,) = self.servers.deployment.status()
            borrowed = sum(s["stats"].kv_blocks_borrowed for s in device["services"]
                           if s.get("stats") is not None)
            self.samples.append({"t_s": time.perf_counter() - t0,
                                 "servers_bytes": self.servers.memory()["total_bytes"],
                                 "available_bytes": psutil.virtual_memory().available,
                                 "borrowed_blocks": borrowed})

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def summary(self) -> dict:
        held = [s["servers_bytes"] for s in self.samples]
        free = [s["available_bytes"] for s in self.samples]
        return {"samples": len(held),
                "servers_mean_bytes": sum(held) / len(held) if held else None,
                "servers_min_bytes": min(held, default=None),
                "servers_max_bytes": max(held, default=None),
                "available_mean_bytes": sum(free) / len(free) if free else None,
                "borrowed_blocks_max": max((s.get("borrowed_blocks", 0)
                                            for s in self.samples), default=None)}


def wake_histogram(metrics_url: str) -> dict:
    """Every service's wake buckets added up: upper bound -> cumulative count, and sum."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=30) as resp:
        text = resp.read().decode()
    buckets: dict[float, float] = {}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == WAKE_SERIES + "_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
            elif s.name == WAKE_SERIES + "_sum":
                total += s.value
    return {"buckets": sorted(buckets.items()), "sum": total}


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Linear interpolation within the bucket that holds rank q, as Prometheus does."""
    count = buckets[-1][1] if buckets else 0
    if count == 0:
        return None
    rank, lower, below = q * count, 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = bound, cumulative
    return lower


def run_turns(targets, spec: LoadSpec, prompts, burst_s: float, cycles: int,
              timeout_s: float) -> list[dict]:
    """Each target busy for burst_s in turn, cycles times, with spec.concurrency
    requests in flight; one record per request."""
    rows, t0, lock = [], time.perf_counter(), threading.Lock()
    counter = iter(range(10**9))

    def stream(target, stream_index: int, end: float, cycle: int, first: bool) -> None:
        while time.perf_counter() < end:
            with lock:
                index = next(counter)
            planned = planned_request(spec, prompts, stream_index, index)
            record = RequestRecord(target.name, index, 0.0, planned.target_prompt_tokens,
                                   planned.max_tokens)
            send(target, planned, record, t0, timeout_s)
            with lock:
                rows.append({**record.to_json(), "cycle": cycle, "first_in_burst": first})
            first = False

    for cycle in range(cycles):
        for i, target in enumerate(targets):
            end = time.perf_counter() + burst_s
            workers = [threading.Thread(target=stream, args=(target, i * spec.concurrency + k,
                                                             end, cycle, k == 0))
                       for k in range(spec.concurrency)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
    return rows


def by_service(rows: list[dict]) -> dict[str, dict]:
    """TTFT p50/p99 of each service's completed requests."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["service"] for r in rows):
        ttft = [r["ttft_s"] for r in rows if r["service"] == name and r["error"] is None]
        out[name] = {"completed": len(ttft), "ttft_p50_s": percentile(ttft, 0.5),
                     "ttft_p99_s": percentile(ttft, 0.99)}
    return out


def summarize_scenario(rows: list[dict], memory: dict, wakes: dict) -> dict:
    ok = [r for r in rows if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok]
    first = [r["ttft_s"] for r in ok if r["first_in_burst"]]
    buckets = wakes["buckets"]
    count = buckets[-1][1] if buckets else 0
    return {"status": "ok", "completed": len(ok), "failed": len(rows) - len(ok),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "first_in_burst_ttft_p50_s": percentile(first, 0.5),
            "first_in_burst_ttft_p99_s": percentile(first, 0.99),
            "memory": memory, "wakes": int(count),
            "wake_mean_s": wakes["sum"] / count if count else None,
            "wake_p50_s": histogram_quantile(0.5, buckets),
            "wake_p99_s": histogram_quantile(0.99, buckets),
            "by_service": by_service(rows), "requests": rows}


def markdown(result: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.0f}"

    lines = ["| scenario | done | failed | TTFT p50/p99 ms | first-in-burst TTFT p50/p99 ms | "
             "TTFT p50/p99 ms per service | servers PSS mean / min / max MiB | "
             "MemAvailable mean MiB | blocks borrowed max | wakes | "
             "wake mean / p50 / p99 ms |", "|" + " --- |" * 11]
    for name, s in result["scenarios"].items():
        if s["status"] != "ok":
            lines.append(f"| {name} | {s['status']}: {s['reason']} |" + " |" * 10)
            continue
        m = s["memory"]
        per = ", ".join(f"{n} {ms(v['ttft_p50_s'])}/{ms(v['ttft_p99_s'])}"
                        for n, v in s.get("by_service", {}).items())
        borrowed = m.get("borrowed_blocks_max")
        lines.append(
            f"| {name} | {s['completed']} | {s['failed']} | {ms(s['ttft_p50_s'])} / "
            f"{ms(s['ttft_p99_s'])} | {ms(s['first_in_burst_ttft_p50_s'])} / "
            f"{ms(s['first_in_burst_ttft_p99_s'])} | {per or '-'} | "
            f"{mib(m['servers_mean_bytes'])} / "
            f"{mib(m['servers_min_bytes'])} / {mib(m['servers_max_bytes'])} | "
            f"{mib(m['available_mean_bytes'])} | {'-' if borrowed is None else borrowed} | "
            f"{s['wakes']} | {ms(s['wake_mean_s'])} / "
            f"{ms(s['wake_p50_s'])} / {ms(s['wake_p99_s'])} |")
    return "\n".join(lines) + "\n"


def run_bursty(args, config, prompts, start_servers) -> dict:
    """Every scenario in turn; start_servers(config) -> ColocateServers."""
    spec = LoadSpec(concurrency=args.burst_concurrency, num_requests=10**9,
                    prompt_tokens=args.prompt_range, output_tokens=args.output_range,
                    seed=args.seed, request_timeout_s=args.request_timeout)
    scenarios: dict[str, dict] = {}
    for name in args.bursty_scenarios.split(","):
        print(f"== bursty {name}: starting", flush=True)
        with start_servers(scenario_config(config, name, args.sleep_after)) as servers:
            with MemorySampler(servers, args.sample) as sampler:
                rows = run_turns(servers.targets, spec, prompts, args.burst, args.cycles,
                                 args.request_timeout)
            url = servers.deployment.metrics_urls()[servers.gpu.entry_name]
            scenarios[name] = summarize_scenario(rows, sampler.summary(), wake_histogram(url))
        print(f"   {scenarios[name]['completed']} done", flush=True)
    return {"burst_s": args.burst, "cycles": args.cycles, "sleep_after_s": args.sleep_after,
            "burst_concurrency": args.burst_concurrency,
            "services": [s.name for s in config.gpus[0].services], "scenarios": scenarios}
