"""Bounded load test of a running deployment, on loopback.

Closed loop: at each concurrency level, that many workers per service send
streaming Generate calls back to back for `--step-seconds`; the levels double
(1, 2, 4, ...) up to `--max-concurrency`, and the ramp stops early once a level
adds less than 10% throughput over the previous one (the service is saturated).
Every call has a deadline, and the whole run a time limit, so nothing here can
run away. Refused calls back off briefly, as a well-behaved client would; without
that a refusal loop measures how fast the client can spin, not the service.

Per level it reports throughput (requests and tokens per second), errors counted
by status code, and TTFT and end-to-end latency percentiles; afterwards it checks
through GetStats that every service's KV pool is whole again (no block used, no
request left). Like the other benchmarks it asserts nothing: it prints a table
and writes JSON.

    python bench/load.py --deploy tiny --json load.json        # starts and stops its own
    python bench/load.py --target 127.0.0.1:50051 --token "$TENANT_A_TOKEN" ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colocate.client import Client  # noqa: E402

REFUSED_BACKOFF_S = 0.01
SATURATION_GAIN = 1.10          # a level must add 10% throughput to count as unsaturated


@dataclass(frozen=True)
class Target:
    name: str
    address: str
    token: str


@dataclass
class LevelResult:
    concurrency: int                   # workers per service
    seconds: float
    ok: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft: list[float] = field(default_factory=list, repr=False)
    e2e: list[float] = field(default_factory=list, repr=False)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict:
        return dict(concurrency=self.concurrency, seconds=round(self.seconds, 2),
                    ok=self.ok, errors=dict(self.errors),
                    requests_per_s=round(self.requests_per_s, 2),
                    tokens_per_s=round(self.tokens_per_s, 1),
                    ttft_ms=percentiles(self.ttft), e2e_ms=percentiles(self.e2e))


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 in milliseconds (nearest rank)."""
    ordered = sorted(values)
    out = {}
    for p in (50, 90, 99):
        out[f"p{p}"] = (round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))], 2)
                        if ordered else None)
    return out


def one_call(client: Client, prompt: list[int], max_tokens: int,
             timeout: float) -> tuple[float, float, int]:
    """(ttft, e2e, tokens) of one streamed greedy request; raises grpc.RpcError."""
    start = time.perf_counter()
    first, tokens = None, 0
    for delta in client.generate(prompt, max_tokens=max_tokens, temperature=0.0,
                                 ignore_eos=True, timeout=timeout):
        if first is None and delta.token_ids:
            first = time.perf_counter() - start
        tokens += len(delta.token_ids)
    return first or 0.0, time.perf_counter() - start, tokens


def run_level(targets: list[Target], concurrency: int, seconds: float, max_tokens: int,
              prompt_len: int, call_timeout: float) -> LevelResult:
    result = LevelResult(concurrency, seconds)
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(target: Target, index: int) -> None:
        # A different prompt per worker, so the prefix cache does not make it free.
        prompt = [1] + [(7 * index + 13 * j) % 250 + 3 for j in range(prompt_len - 1)]
        with Client(target.address, target.token) as client:
            while time.monotonic() < stop_at:
                try:
                    ttft, e2e, n = one_call(client, prompt, max_tokens, call_timeout)
                except grpc.RpcError as err:
                    with lock:
                        code = err.code().name
                        result.errors[code] = result.errors.get(code, 0) + 1
                    time.sleep(REFUSED_BACKOFF_S)
                    continue
                with lock:
                    result.ok += 1
                    result.tokens += n
                    result.ttft.append(ttft)
                    result.e2e.append(e2e)

    threads = [threading.Thread(target=worker, args=(t, i), daemon=True)
               for t in targets for i in range(concurrency)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + call_timeout + 5)
    result.seconds = time.monotonic() - began
    return result


def ramp(targets: list[Target], *, levels: list[int], step_seconds: float, max_tokens: int,
         prompt_len: int, call_timeout: float, time_limit: float) -> list[LevelResult]:
    results: list[LevelResult] = []
    deadline = time.monotonic() + time_limit
    for level in levels:
        if time.monotonic() + step_seconds > deadline:
            break
        res = run_level(targets, level, step_seconds, max_tokens, prompt_len, call_timeout)
        results.append(res)
        print(f"  concurrency {level:>3}/service: {res.requests_per_s:7.2f} req/s  "
              f"{res.tokens_per_s:8.1f} tok/s  errors {res.errors or '-'}", flush=True)
        if (len(results) > 1 and
                res.tokens_per_s < SATURATION_GAIN * results[-2].tokens_per_s):
            break               # saturated: more workers only queue
    return results


def pools_whole(targets: list[Target], settle_s: float = 10.0) -> dict[str, dict]:
    """Each service's GetStats once it has drained (or after `settle_s`)."""
    out = {}
    for t in targets:
        deadline = time.monotonic() + settle_s
        with Client(t.address, t.token, timeout=10) as client:
            while True:
                s = client.stats()
                idle = s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0
                if idle or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        out[t.name] = dict(kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                           num_running=s.num_running, num_waiting=s.num_waiting, whole=idle)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_deployment_yaml(directory: Path, services: int = 3) -> Path:
    """A CPU deployment of the `tiny` preset: the cheapest real thing to load."""
    body = "".join(f"""
      - name: tiny-{i}
        model: tiny
        port: {free_port()}
        max_model_len: 512
        kv_cache: {{dtype: auto, tokens: 2048}}
        max_num_seqs: 16
        max_queued_requests: 32
        tenants: [{{name: t{i}, token_env: LOAD_TOKEN_{i}}}]""" for i in range(services))
    path = directory / "load-tiny.yaml"
    path.write_text(f"""models:
  tiny: {{path: "preset:tiny", dtype: float32}}
gpus:
  - device: cpu
    services:{body}
""")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--deploy", metavar="CONFIG",
                       help="start this deployment YAML (or 'tiny') for the run, then stop it")
    where.add_argument("--target", action="append", help="HOST:PORT of a running service")
    ap.add_argument("--token", action="append", help="bearer token, one per --target")
    ap.add_argument("--levels", default="1,2,4,8,16",
                    help="workers per service at each step (default %(default)s)")
    ap.add_argument("--step-seconds", type=float, default=5.0)
    ap.add_argument("--time-limit", type=float, default=120.0, help="for the whole ramp")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--call-timeout", type=float, default=30.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    limits = dict(levels=levels, step_seconds=args.step_seconds, max_tokens=args.max_tokens,
                  prompt_len=args.prompt_len, call_timeout=args.call_timeout,
                  time_limit=args.time_limit)

    if args.target:
        tokens = args.token or []
        if len(tokens) != len(args.target):
            ap.error("give one --token per --target")
        targets = [Target(a, a, tok) for a, tok in zip(args.target, tokens)]
        report = dict(levels=[r.summary() for r in ramp(targets, **limits)],
                      pools=pools_whole(targets))
    else:
        report = run_with_deployment(args.deploy, limits)
    print(json.dumps(report["pools"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def run_with_deployment(config: str, limits: dict) -> dict:
    from colocate.cluster.deploy import Deployment, load_with_demo_tokens

    with tempfile.TemporaryDirectory() as scratch:
        path = tiny_deployment_yaml(Path(scratch)) if config == "tiny" else Path(config)
        cfg, _ = load_with_demo_tokens(path)
        token_of = {s.name: s.tenants[0].token for _, s in cfg.services()}
        with Deployment(cfg) as dep:
            endpoints = dep.wait_ready()
            targets = [Target(e.service, e.target, token_of[e.service]) for e in endpoints]
            print(f"load on {len(targets)} service(s) ({os.cpu_count()} cores):", flush=True)
            levels = ramp(targets, **limits)
            pools = pools_whole(targets)
            status = dep.status()
    rows = [dict(name=s["name"], state=s["state"], restarts=s["restarts"],
                 kv_blocks_used=s["stats"].kv_blocks_used if s["stats"] else None)
            for dev in status for s in dev["services"]]
    return dict(levels=[r.summary() for r in levels], pools=pools, status=rows)


if __name__ == "__main__":
    sys.exit(main())
