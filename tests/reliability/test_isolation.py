"""Isolation and budgets, through the real supervisor, Ray actors and gRPC.

- a request that cannot fit its service's whole KV budget is refused at once;
- a full queue answers RESOURCE_EXHAUSTED, and a tenant flooding its service until
  it refuses work leaves another service's queue empty and its calls all served
  (the TTFTs before and during are recorded as figures; timing limits belong to
  bench/load.py, not to a test on a shared 2-core machine);
- under KV pressure the engine preempts, and every request still gets exactly the
  tokens it gets alone (which request is preempted, the newest, is shown at block
  level by tests/engine/test_engine_scheduling.py::test_newest_running_request_is_preempted_first).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray
import torch

from colocate.client import Client
from colocate.sampling_params import SamplingParams
from tests.deployment.helpers import stream_tokens, token_of
from tests.service.helpers import wait_until
from tests.reliability.conftest import SERVICES
from tests.reliability.reliability_helpers import (p99, record, reliability_deployment,
                                                   service_rows, timed_stream)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FLOOD_SECONDS = 6.0
TTFT_SAMPLES = 40


def test_request_beyond_the_whole_kv_budget_is_refused_at_once(targets):
    budget = SERVICES["svc-a"]["kv_tokens"]
    prompt = [1] + list(range(10, 60))             # 51 tokens + 250 > 256, < max_model_len
    with pytest.raises(grpc.RpcError) as err:
        stream_tokens(targets["svc-a"], token_of("svc-a"), prompt, max_tokens=250)
    # Refused by validation when it arrives, not queued: a queued request is served or
    # preempted, never answered INVALID_ARGUMENT; and nothing of it is left behind.
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"kv_cache_tokens={budget}" in err.value.details()
    with Client(targets["svc-a"], token_of("svc-a")) as client:
        stats = client.stats()
    assert (stats.num_waiting, stats.num_running, stats.kv_blocks_used) == (0, 0, 0)
    # Just inside the budget is served.
    assert len(stream_tokens(targets["svc-a"], token_of("svc-a"), prompt,
                             max_tokens=budget - len(prompt), ignore_eos=True)) == 205


def test_a_full_queue_is_resource_exhausted(targets):
    """svc-c runs one request and queues two: of six, the three that arrive with the
    queue full are refused by its bound and the others complete. Each arrives once the
    service's own stats show the one before it admitted, so the outcome does not hang
    on how fast the first request decodes."""
    codes, details = [], []

    def call():
        try:
            stream_tokens(targets["svc-c"], token_of("svc-c"), [1, 5, 9, 13],
                          max_tokens=400, ignore_eos=True)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            details.append(err.details())

    workers = [threading.Thread(target=call) for _ in range(6)]
    with Client(targets["svc-c"], token_of("svc-c")) as client:
        def held() -> int:
            stats = client.stats()
            return stats.num_running + stats.num_waiting

        for i, w in enumerate(workers[:3]):
            w.start()
            wait_until(lambda: held() == i + 1, timeout=30, what=f"request {i + 1} admitted")
        for w in workers[3:]:
            w.start()
        for w in workers:
            w.join(60)
    assert codes.count(grpc.StatusCode.OK) == 3
    refused = [c for c in codes if c != grpc.StatusCode.OK]
    assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert any("max_queued_requests=2" in d for d in details)


def _ttfts(target: str, service: str, n: int, waiting: list[int] | None = None) -> list[float]:
    """n sequential calls, each served in full; with `waiting`, the service's queue
    length is read after each."""
    out = []
    with Client(target, token_of(service)) as client:
        for i in range(n):
            tokens, ttft = timed_stream(target, service, [1, 20 + i % 7, 30, 40], max_tokens=4,
                                        ignore_eos=True)
            assert len(tokens) == 4
            out.append(ttft)
            if waiting is not None:
                waiting.append(client.stats().num_waiting)
    return out


def test_a_flood_on_one_service_leaves_anothers_queue_empty(targets, tmp_path):
    """bench/load.py floods svc-a from another process (so the measuring client
    here does not share its GIL) with four times the workers svc-a can run and
    queue; svc-b keeps serving every call with nothing queued behind it, and its
    TTFT before and during is recorded."""
    _ttfts(targets["svc-b"], "svc-b", 5)                       # warm-up
    idle = _ttfts(targets["svc-b"], "svc-b", TTFT_SAMPLES)
    flood = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "load.py"), "--target", targets["svc-a"],
         "--token", token_of("svc-a"), "--levels", "32", "--step-seconds",
         str(FLOOD_SECONDS), "--time-limit", str(FLOOD_SECONDS + 5), "--max-tokens", "64",
         "--json", str(tmp_path / "flood.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)                # the flood is at full strength
        waiting = []
        flooded = _ttfts(targets["svc-b"], "svc-b", TTFT_SAMPLES, waiting)
        flood.communicate(timeout=FLOOD_SECONDS + 60)
    finally:
        flood.kill()
    level = json.loads((tmp_path / "flood.json").read_text())["levels"][0]
    figures = dict(idle_p50_ms=1000 * sorted(idle)[len(idle) // 2], idle_p99_ms=1000 * p99(idle),
                   flood_p50_ms=1000 * sorted(flooded)[len(flooded) // 2],
                   flood_p99_ms=1000 * p99(flooded), flood=level)
    record(tmp_path, "flood_isolation", figures)
    # The flood was real: svc-a was refusing work for being full.
    assert level["errors"].get("RESOURCE_EXHAUSTED", 0) > 0 and level["ok"] > 0
    # ...and none of it reached svc-b's queue: every call served, nothing waiting.
    assert len(flooded) == TTFT_SAMPLES and max(waiting) == 0, figures


def test_preempted_requests_complete_with_their_own_tokens(deployment, targets,
                                                           tiny_model_dir, tmp_path):
    """Four greedy requests of 180 tokens each against svc-a's 16-block pool: at most
    one fits whole at a time, so the engine preempts; each must still produce what
    it produces alone."""
    from colocate import LLM

    prompts = [[1] + [11 + 5 * i + j for j in range(19)] for i in range(4)]
    params = dict(max_tokens=160, temperature=0.0, ignore_eos=True)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=str(tiny_model_dir), kv_cache_tokens=512, max_model_len=512)
        expected = [o.token_ids for o in llm.generate(prompts, SamplingParams(**params))]
        del llm
    finally:
        torch.set_num_threads(before)

    supervisor = deployment.supervisor("cpu")
    actor = ray.get(supervisor.service_actor.remote("svc-a"))
    preempted_before = ray.get(actor.metrics.remote()).stats.preemptions
    got = [None] * len(prompts)

    def call(i):
        got[i] = stream_tokens(targets["svc-a"], token_of("svc-a"), prompts[i], **params)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    preemptions = ray.get(actor.metrics.remote()).stats.preemptions - preempted_before
    record(tmp_path, "preemption", dict(requests=len(prompts), preemptions=preemptions))
    assert preemptions > 0
    assert got == expected
    assert service_rows(deployment)["svc-a"]["stats"].kv_blocks_used == 0


def test_two_supervisors_on_one_device_cannot_book_the_same_bytes(ray_session,
                                                                  tiny_model_dir, tmp_path):
    """Two deployments start at once on one device that holds only one of them:
    exactly one is admitted, and the refusal names the other supervisor's booking.
    Their shared ledger lives in tmp_path, away from other runs on this host."""
    from colocate.memory.arbiter import MemoryArbiter
    from colocate.cluster.deploy import Deployment
    from colocate.cluster.supervisor import DeploymentError

    probe = reliability_deployment(tmp_path / "probe", str(tiny_model_dir), {"x": {}})
    arbiter = MemoryArbiter.for_device(probe.gpus[0], probe)
    (spec,) = probe.gpus[0].services
    # Both supervisors' own rows, one service, and half another: one fits, two do not.
    capacity = 2 * arbiter.supervisor_bytes + arbiter.cost(spec) * 3 // 2
    configs = [reliability_deployment(tmp_path / n, str(tiny_model_dir), {n: {}},
                                      memory=str(capacity)) for n in ("race-1", "race-2")]
    barrier, started, refused = threading.Barrier(2), [], []

    def start(config):
        barrier.wait()
        try:
            started.append(Deployment(config, torch_threads=1,
                                      ledger_dir=str(tmp_path / "ledger")))
        except DeploymentError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=start, args=(c,)) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    try:
        assert len(started) == 1 and len(refused) == 1, (started, refused)
        assert "booked by other supervisors" in refused[0]
        started[0].wait_ready(timeout=120)
    finally:
        for dep in started:
            dep.shutdown()
    # Once the winner has stopped, the device is free for the other again.
    with Deployment(configs[1], torch_threads=1, ledger_dir=str(tmp_path / "ledger")):
        pass
