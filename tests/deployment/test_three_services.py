"""Three services of the tiny checkpoint through the real supervisor, Ray and gRPC.

One deployment serves the whole module (startup is most of the cost); the restart
test runs last because it replaces a service.
"""
from __future__ import annotations

import threading
import time

import pytest
import ray

from colocate.memory.sizing import KV_BLOCK_SIZE
from tests.deployment.helpers import (scrape_by_service, service_rows, stats_while_running,
                                      stream_tokens, token_of)
from tests.deployment.service_contract import (KV_TOKENS, ServiceContract, requests_for,
                                               three_services)

NAMES = ["svc-a", "svc-b", "svc-c"]
REQUESTS = requests_for(NAMES)


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    with three_services(tmp_path_factory.mktemp("three"), tiny_model_dir, NAMES) as dep:
        yield dep


class TestServiceContract(ServiceContract):
    NAMES = NAMES


def test_kv_pool_never_exceeds_its_budget(deployment, targets):
    """Twelve long requests against a 16-block pool: the engine preempts (counted by
    the service's metrics), the pool stays within its blocks, and the other services'
    pools stay empty and see no preemption."""
    metrics_url = deployment.metrics_urls()["cpu"]
    preempted_before = scrape_by_service(metrics_url, "colocate_preemptions_total")
    budget_blocks = KV_TOKENS // KV_BLOCK_SIZE
    prompts = [[1] + [10 + 7 * i + j for j in range(40)] for i in range(12)]
    finished = []

    def load(prompt):
        finished.append(stream_tokens(targets["svc-a"], token_of("svc-a"), prompt,
                                      max_tokens=150, temperature=0.0, ignore_eos=True))

    workers = [threading.Thread(target=load, args=(p,)) for p in prompts]
    samples = stats_while_running(deployment, workers)

    assert len(finished) == 12 and all(len(t) == 150 for t in finished)
    loaded = [s["svc-a"] for s in samples if s["svc-a"] is not None]
    assert len(loaded) >= 5
    assert all(s.kv_blocks_total == budget_blocks for s in loaded)
    assert all(s.kv_blocks_used <= s.kv_blocks_total for s in loaded)
    assert max(s.kv_blocks_used for s in loaded) > budget_blocks // 2   # it was under pressure
    # 12 x 191 tokens want 144 blocks of a 16-block pool: only preemption finished them.
    preempted = scrape_by_service(metrics_url, "colocate_preemptions_total")
    assert preempted["svc-a"] > preempted_before.get("svc-a", 0)
    assert all(preempted.get(o, 0) == preempted_before.get(o, 0) for o in ("svc-b", "svc-c"))
    for other in ("svc-b", "svc-c"):
        assert all(s[other].kv_blocks_used == 0 for s in samples if s[other] is not None)
        assert all(s[other].kv_blocks_total == budget_blocks
                   for s in samples if s[other] is not None)


def test_killed_service_is_restarted_alone(deployment, targets):
    supervisor = deployment.supervisor("cpu")
    (before,) = deployment.status()
    victim = "svc-b"
    prompt, sampling = REQUESTS[victim]
    answer_before = stream_tokens(targets[victim], token_of(victim), prompt, **sampling)
    old_pid = service_rows(deployment)[victim]["stats"].pid

    # The other two keep answering while the victim is down and coming back.
    stop, served, failures = threading.Event(), {"svc-a": 0, "svc-c": 0}, []

    def keep_calling(name):
        while not stop.is_set():
            try:
                stream_tokens(targets[name], token_of(name), "Hello", max_tokens=4)
                served[name] += 1
            except Exception as exc:
                failures.append((name, exc))

    callers = [threading.Thread(target=keep_calling, args=(n,)) for n in served]
    for c in callers:
        c.start()
    try:
        actor = ray.get(supervisor.service_actor.remote(victim))
        served_at_kill = dict(served)
        ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + 120
        while True:
            row = service_rows(deployment)[victim]
            if row["restarts"] == 1 and row["state"] == "running":
                break
            assert time.monotonic() < deadline, f"not restarted: {row}"
            time.sleep(0.2)
        served_during = {n: served[n] - served_at_kill[n] for n in served}
    finally:
        stop.set()
        for c in callers:
            c.join(60)

    assert not failures
    assert all(n > 0 for n in served_during.values())
    (after,) = deployment.status()
    assert after["reserved_bytes"] == before["reserved_bytes"]
    assert sorted(after["ledger"]) == sorted(before["ledger"])
    rows = {s["name"]: s for s in after["services"]}
    assert rows[victim]["stats"].pid != old_pid
    assert rows["svc-a"]["restarts"] == rows["svc-c"]["restarts"] == 0
    assert stream_tokens(targets[victim], token_of(victim), prompt, **sampling) == answer_before
