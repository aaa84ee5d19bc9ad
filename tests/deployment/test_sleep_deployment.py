"""sleep_after_idle through the real supervisor, Ray and gRPC: two services of the tiny
checkpoint with equal 128 MiB pools, one of them sleeping after 2 s idle.

The pool's return is measured as the services' PSS: both map the same weights and run
the same code, so once one sleeps the other holds about one pool more."""
from __future__ import annotations

import threading
import time

import pytest

from colocate.client import Client
from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import cpu_deployment, scrape_by_service, stream_tokens, token_of

KV_TOKENS = 32768                       # tiny: 4 KiB of fp32 K+V per token, so 128 MiB
POOL_BYTES = KV_TOKENS * 4096
MiB = 2**20
GREEDY = dict(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    config = cpu_deployment(tmp_path_factory.mktemp("sleep"), str(tiny_model_dir),
                            ["sleepy", "awake"], kv_tokens=KV_TOKENS,
                            per_service={"sleepy": {"sleep_after_idle": "2s"}})
    with Deployment(config, torch_threads=1, health_interval_s=0.5) as dep:
        dep.wait_ready(timeout=180)
        yield dep


def rows(deployment) -> dict[str, dict]:
    (device,) = deployment.status()
    return {s["name"]: s for s in device["services"]}


def wait_asleep(deployment, timeout: float = 60.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        now = rows(deployment)
        if now["sleepy"]["stats"].sleeping:
            return now
        assert time.monotonic() < deadline, "sleepy never fell asleep"
        time.sleep(0.2)


def test_an_idle_service_gives_its_pool_back_and_keeps_its_budget(deployment, targets):
    (before,) = deployment.status()
    now = wait_asleep(deployment)
    sleepy, awake = now["sleepy"]["stats"], now["awake"]["stats"]
    assert not awake.sleeping and sleepy.healthy
    gap = awake.pss_bytes - sleepy.pss_bytes
    print(f"\nPSS awake {awake.pss_bytes / MiB:.0f} MiB, asleep {sleepy.pss_bytes / MiB:.0f} "
          f"MiB, pool {POOL_BYTES / MiB:.0f} MiB")
    assert gap > 0.9 * POOL_BYTES, (gap / MiB, POOL_BYTES / MiB)
    (after,) = deployment.status()
    assert after["ledger"] == before["ledger"]          # the budget stays booked
    metrics = deployment.metrics_urls()["cpu"]
    assert scrape_by_service(metrics, "colocate_service_sleeping") == {"sleepy": 1, "awake": 0}
    with Client(targets["sleepy"], token_of("sleepy")) as client:
        assert client.model_info().sleeping and client.health() == "SERVING"


def test_the_next_request_wakes_it_with_the_same_answer_beside_a_streaming_neighbour(
        deployment, targets):
    prompt, long_prompt = "The quick brown fox", [1, 50, 60, 70, 80]
    answer = stream_tokens(targets["sleepy"], token_of("sleepy"), prompt, **GREEDY)
    neighbour_alone = stream_tokens(targets["awake"], token_of("awake"), long_prompt,
                                    max_tokens=200, temperature=0.0)
    wait_asleep(deployment)
    wakes = scrape_by_service(deployment.metrics_urls()["cpu"],
                              "colocate_service_wake_seconds_count")["sleepy"]
    neighbour: dict = {"tokens": []}
    streaming = threading.Event()

    def stream_on_the_neighbour():
        with Client(targets["awake"], token_of("awake"), timeout=120) as client:
            for delta in client.generate(long_prompt, max_tokens=200, temperature=0.0):
                neighbour["tokens"] += delta.token_ids
                streaming.set()

    thread = threading.Thread(target=stream_on_the_neighbour)
    thread.start()
    assert streaming.wait(60)              # the neighbour is mid-stream when sleepy wakes
    again = stream_tokens(targets["sleepy"], token_of("sleepy"), prompt, **GREEDY)
    thread.join(120)
    assert again == answer and len(answer) == GREEDY["max_tokens"]
    assert neighbour["tokens"] == neighbour_alone
    after = scrape_by_service(deployment.metrics_urls()["cpu"],
                              "colocate_service_wake_seconds_count")
    assert after["sleepy"] == wakes + 1 and after["awake"] == 0
