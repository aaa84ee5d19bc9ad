"""What the reliability tests share: a deployment YAML with per-service limits,
streaming with timings, latency percentiles, and waits on the supervisor."""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc

from colocate.client import Client
from colocate.config import DeploymentConfig
from tests.deployment.helpers import cpu_deployment, service_rows, token_of

# Every streamed call gets a deadline: a hang shows as DEADLINE_EXCEEDED, never
# as a stuck test.
CALL_TIMEOUT_S = 60.0


def reliability_deployment(directory: Path, model_path: str, services: dict[str, dict], *,
                           memory: str = "16GiB") -> DeploymentConfig:
    """One CPU device; `services` maps a name to keys that override the defaults
    (kv_tokens, max_model_len, max_num_seqs, max_num_batched_tokens, max_queued_requests)."""
    defaults = dict(kv_tokens=512, max_model_len=512, max_num_seqs=4,
                    max_num_batched_tokens=128, max_queued_requests=8)
    per_service = {}
    for name, extra in services.items():
        o = {**defaults, **extra}
        per_service[name] = {"max_model_len": o["max_model_len"],
                             "kv_cache": {"dtype": "auto", "tokens": o["kv_tokens"]},
                             "max_num_seqs": o["max_num_seqs"],
                             "max_num_batched_tokens": o["max_num_batched_tokens"],
                             "max_queued_requests": o["max_queued_requests"]}
    return cpu_deployment(directory, model_path, list(services), memory=memory,
                          per_service=per_service, file_name="reliability.yaml")


def timed_stream(target: str, service: str, prompt, **sampling) -> tuple[list[int], float]:
    """(tokens, seconds to the first token) of one streamed call."""
    start = time.perf_counter()
    ttft, tokens = None, []
    with Client(target, token_of(service), timeout=CALL_TIMEOUT_S) as client:
        for delta in client.generate(prompt, **sampling):
            if ttft is None and delta.token_ids:
                ttft = time.perf_counter() - start
            tokens += delta.token_ids
    return tokens, ttft


def call_status(fn) -> grpc.StatusCode:
    """OK, or the status code the call ended with."""
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]




def wait_restarted(deployment, name: str, restarts: int, timeout: float = 60.0) -> float:
    """Wait until `name` has `restarts` restarts and runs again; the seconds waited."""
    start = time.monotonic()
    while True:
        row = service_rows(deployment)[name]
        if row["restarts"] >= restarts and row["state"] == "running":
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{name} not restarted: {row}"
        time.sleep(0.1)


def record(tmp_dir: Path, name: str, figures: dict) -> None:
    """Print the measured figures and keep them as JSON under the test's tmp dir."""
    print(f"\n{name}: {json.dumps(figures)}")
    (tmp_dir / f"{name}.json").write_text(json.dumps(figures, indent=1))
