"""`batching: fused`: three services of the tiny checkpoint in ONE process, decoding
as one batch, through the real supervisor, Ray and gRPC; each keeps its own doors
(gRPC and OpenAI HTTP), tenants, pool and prefix cache, and the group is restarted as one.
fu-c lends its idle blocks (`kv_cache: {lend: true}`) to the others; fu-b sleeps alone
when idle."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from tests.faults import HOOKS
from colocate.client import Client
from tests.deployment.helpers import (free_ports, scrape_by_service, service_rows,
                                      stream_tokens, token_of)
from tests.deployment.lending_flow import check_borrow_and_reclaim
from tests.deployment.service_contract import KV_TOKENS, ServiceContract, three_services

pytestmark = pytest.mark.slow
NAMES = ["fu-a", "fu-b", "fu-c"]
SLEEPER_TOKENS = 32768                   # tiny: 4 KiB of fp32 K+V per token, so 128 MiB
MiB = 2**20


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    # gRPC and HTTP ports from one call, so no two of them can be the same port.
    ports = free_ports(2 * len(NAMES))
    http = {name: {"port": ports[i], "http_port": ports[len(NAMES) + i]}
            for i, name in enumerate(NAMES)}
    http["fu-c"]["kv_cache"] = {"dtype": "auto", "tokens": KV_TOKENS, "lend": True}
    # fu-b sleeps alone after 2 s idle; its 128 MiB range makes the pages it gives back
    # plain in the process's PSS.
    http["fu-b"].update(sleep_after_idle="2s",
                        kv_cache={"dtype": "auto", "tokens": SLEEPER_TOKENS})
    with three_services(tmp_path_factory.mktemp("fused"), tiny_model_dir, NAMES,
                        device_extra={"batching": "fused"}, per_service=http,
                        test_hooks=HOOKS) as dep:
        yield dep


class TestServiceContract(ServiceContract):
    NAMES = NAMES


def test_one_process_serves_every_service(deployment):
    pids = {r["stats"].pid for r in service_rows(deployment).values()}
    assert len(pids) == 1


def test_each_member_serves_openai_http_on_its_own_port(deployment, targets):
    import openai

    urls = {e.service: e.http_url for e in deployment.endpoints()}
    assert len(set(urls.values())) == len(NAMES) and all(urls.values())
    for name in NAMES:
        sdk = openai.OpenAI(base_url=urls[name], api_key=token_of(name), max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["m"]
        reply = sdk.completions.create(model="m", prompt=[1, 50, 60], max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
        with Client(targets[name], token_of(name), timeout=60) as client:
            want = client.generate_text([1, 50, 60], max_tokens=5, temperature=0.0,
                                        ignore_eos=True)
        assert reply.choices[0].text == want and reply.usage.completion_tokens == 5
    # a member's tenant is a stranger at another member's HTTP door, as over gRPC
    stranger = openai.OpenAI(base_url=urls["fu-a"], api_key=token_of("fu-b"), max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model="m", prompt=[1, 2], max_tokens=2)


def test_a_borrower_uses_the_lenders_idle_blocks_and_the_lender_gets_them_back(
        deployment, targets, tiny_model_dir):
    """fu-a's flood fills its own pool and borrows lending fu-c's idle blocks, never
    fu-b's; fu-c's request, sent once every block of it is lent, takes them back;
    every greedy answer is the offline one, and GetStats reports the loans."""
    check_borrow_and_reclaim(deployment, targets, tiny_model_dir, NAMES,
                             borrower="fu-a", lender="fu-c", bystander="fu-b")


def test_a_member_sleeps_alone_while_its_neighbour_streams_and_wakes_with_its_answer(
        deployment, targets):
    prompt, greedy = "The quick brown fox", dict(max_tokens=16, temperature=0.0)
    neighbour_prompt = [1, 50, 60, 70, 80]
    neighbour_alone = stream_tokens(targets["fu-a"], token_of("fu-a"), neighbour_prompt,
                                    max_tokens=100, temperature=0.0)
    # Its stats while awake: read within its 2 s awake after the answer, asked again
    # (a request wakes it) should a loaded machine have taken longer than that.
    for _ in range(5):
        answer = stream_tokens(targets["fu-b"], token_of("fu-b"), prompt, **greedy)
        awake = service_rows(deployment)["fu-b"]["stats"]
        if not awake.sleeping:
            break
    metrics = deployment.metrics_urls()["cpu"]
    wakes = scrape_by_service(metrics, "colocate_service_wake_seconds_count")
    neighbour, stop = [], threading.Event()

    def stream_on_the_neighbour():                           # until fu-b has slept
        while not stop.is_set():
            neighbour.append(stream_tokens(targets["fu-a"], token_of("fu-a"),
                                           neighbour_prompt, max_tokens=100,
                                           temperature=0.0))

    thread = threading.Thread(target=stream_on_the_neighbour)
    thread.start()
    with Client(targets["fu-b"], token_of("fu-b")) as sleeper, \
            Client(targets["fu-a"], token_of("fu-a")) as streamer:
        deadline = time.monotonic() + 60
        while not (sleeper.stats().sleeping and streamer.stats().num_running):
            assert time.monotonic() < deadline, "fu-b never slept beside fu-a's stream"
            time.sleep(0.05)
    asleep = service_rows(deployment)["fu-b"]["stats"]
    assert asleep.sleeping and not awake.sleeping and asleep.pid == awake.pid
    print(f"\ngroup PSS fu-b awake {awake.pss_bytes / MiB:.0f} MiB, asleep "
          f"{asleep.pss_bytes / MiB:.0f} MiB, its range {SLEEPER_TOKENS * 4096 / MiB:.0f} MiB")
    assert awake.pss_bytes - asleep.pss_bytes > 0.9 * SLEEPER_TOKENS * 4096
    assert scrape_by_service(metrics, "colocate_service_sleeping") == \
        {"fu-a": 0, "fu-b": 1, "fu-c": 0}
    stop.set()
    thread.join(120)
    assert stream_tokens(targets["fu-b"], token_of("fu-b"), prompt, **greedy) == answer
    assert neighbour and all(tokens == neighbour_alone for tokens in neighbour)
    after = scrape_by_service(metrics, "colocate_service_wake_seconds_count")
    assert after["fu-b"] == wakes["fu-b"] + 1
    assert (after["fu-a"], after["fu-c"]) == (wakes["fu-a"], wakes["fu-c"]) == (0, 0)


def test_no_prefix_cache_hit_across_services(deployment, targets):
    url = deployment.metrics_urls()["cpu"]
    prompt = [1] + list(range(300, 340))                       # two full blocks and more
    before = scrape_by_service(url, "colocate_prefix_cache_hit_tokens_total")
    for name in ("fu-a", "fu-a", "fu-b"):
        stream_tokens(targets[name], token_of(name), prompt, max_tokens=2)
    hits = scrape_by_service(url, "colocate_prefix_cache_hit_tokens_total")
    assert hits["fu-a"] - before.get("fu-a", 0) >= 32            # a's second call hit a's
    assert hits["fu-b"] == before.get("fu-b", 0)                 # b never sees a's blocks


def test_a_failed_step_fails_its_requests_and_the_group_goes_on(deployment, targets):
    supervisor = deployment.supervisor("cpu")
    handle = ray.get(supervisor.service_actor.remote("fu-a"))
    ray.get(handle.inject_fault.remote("step", 1, "planted-secret"))
    with pytest.raises(grpc.RpcError) as err:
        stream_tokens(targets["fu-b"], token_of("fu-b"), [1, 2, 3], max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "planted-secret" not in err.value.details()
    for name in NAMES:                                           # every service still serves
        assert len(stream_tokens(targets[name], token_of(name), [1, 2, 3], max_tokens=3,
                                 ignore_eos=True)) == 3


def test_a_killed_group_is_unavailable_then_restarted_whole(deployment, targets):
    supervisor = deployment.supervisor("cpu")
    (before,) = deployment.status()
    old_pid = service_rows(deployment)["fu-a"]["stats"].pid
    handle = ray.get(supervisor.service_actor.remote("fu-c"))
    ray.kill(handle.actor, no_restart=True)
    codes = set()
    for name in NAMES:
        try:
            stream_tokens(targets[name], token_of(name), [1, 2], max_tokens=2)
        except grpc.RpcError as exc:
            codes.add(exc.code())
    assert codes == {grpc.StatusCode.UNAVAILABLE}
    deadline = time.monotonic() + 120
    while not all(r["restarts"] == 1 and r["state"] == "running"
                  for r in service_rows(deployment).values()):
        assert time.monotonic() < deadline, service_rows(deployment)
        time.sleep(0.2)
    (after,) = deployment.status()
    assert after["reserved_bytes"] == before["reserved_bytes"]
    assert sorted(after["ledger"]) == sorted(before["ledger"])
    assert len({r["stats"].pid for r in service_rows(deployment).values()} - {old_pid}) == 1
    for name in NAMES:
        assert len(stream_tokens(targets[name], token_of(name), [1, 2], max_tokens=2,
                                 ignore_eos=True)) == 2
