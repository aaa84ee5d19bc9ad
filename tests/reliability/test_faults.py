"""Faults, through the real supervisor, Ray actors and gRPC: a killed service, an
engine step that raises, health checks that fail or hang. Each test waits until
the deployment is whole again before it ends."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import ray

from tests.deployment.helpers import stream_tokens, token_of
from tests.reliability.conftest import FAILED_CHECKS, HEALTH_INTERVAL_S, HEALTH_TIMEOUT_S
from tests.reliability.reliability_helpers import (call_status, record, service_rows,
                                                   wait_restarted)

pytestmark = pytest.mark.slow

LONG = dict(max_tokens=200, temperature=0.0, ignore_eos=True)
PROMPTS = {"svc-a": [1, 30, 31, 32], "svc-b": [1, 40, 41, 42], "svc-c": [1, 50, 51, 52]}
RESTART_BOUND_S = 60.0


def _actor(supervisor, name):
    return ray.get(supervisor.service_actor.remote(name))


def _events(supervisor, name, since: float) -> list[str]:
    return [e["event"] for e in ray.get(supervisor.events.remote())
            if e["service"] == name and e["time"] >= since]


def test_killed_service_fails_its_calls_and_comes_back_alone(deployment, targets,
                                                             supervisor, tmp_path):
    expected = {n: stream_tokens(targets[n], token_of(n), PROMPTS[n], **LONG)
                for n in ("svc-a", "svc-c")}
    ledger_before = deployment.status()[0]["ledger"]
    restarts = service_rows(deployment)["svc-b"]["restarts"]
    got, codes = {}, {}
    victim_started = threading.Event()

    def other(name):
        got[name] = stream_tokens(targets[name], token_of(name), PROMPTS[name], **LONG)

    def victim():
        from colocate.client import Client
        try:
            with Client(targets["svc-b"], token_of("svc-b"), timeout=60) as client:
                for _ in client.generate(PROMPTS["svc-b"], max_tokens=400, ignore_eos=True,
                                         temperature=0.0):
                    victim_started.set()
                    time.sleep(0.01)      # keep the stream open until the kill
            codes["svc-b"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes["svc-b"] = err.code()
        victim_started.set()

    threads = [threading.Thread(target=victim)]
    threads += [threading.Thread(target=other, args=(n,)) for n in expected]
    threads[0].start()
    assert victim_started.wait(30)
    for t in threads[1:]:
        t.start()
    killed_at, wall = time.monotonic(), time.time()
    ray.kill(_actor(supervisor, "svc-b"), no_restart=True)
    threads[0].join(30)
    failed_after = time.monotonic() - killed_at
    healthy_after = wait_restarted(deployment, "svc-b", restarts + 1, RESTART_BOUND_S)
    for t in threads[1:]:
        t.join(60)
    row = service_rows(deployment)["svc-b"]
    record(tmp_path, "kill", dict(call_failed_after_s=round(failed_after, 3),
                                  healthy_after_s=round(healthy_after, 2),
                                  supervisor_restart_s=round(row["last_restart_s"], 2)))
    assert codes["svc-b"] == grpc.StatusCode.UNAVAILABLE and failed_after < 10
    assert got == expected                                   # the others never noticed
    events = _events(supervisor, "svc-b", wall)
    assert events[:4] == ["restarting", "released", "admitted", "healthy"]
    assert sorted(deployment.status()[0]["ledger"]) == sorted(ledger_before)
    assert stream_tokens(targets["svc-b"], token_of("svc-b"), [1, 2, 3], max_tokens=3)


def test_metrics_say_restarting_until_the_killed_service_is_back(deployment, supervisor):
    """colocate_service_state, as the supervisor samples it for /metrics (and `colocate
    top` shows it): the killed service goes serving -> restarting -> serving, and
    its neighbours stay serving throughout."""
    restarts = service_rows(deployment)["svc-a"]["restarts"]
    ray.kill(_actor(supervisor, "svc-a"), no_restart=True)
    seen = []
    deadline = time.monotonic() + RESTART_BOUND_S
    while time.monotonic() < deadline:
        states = dict(ray.get(supervisor.metrics_sample.remote()).states)
        assert states["svc-b"] == states["svc-c"] == "serving", states
        if not seen or seen[-1] != states["svc-a"]:
            seen.append(states["svc-a"])
        if seen[-2:] == ["restarting", "serving"]:
            break
        time.sleep(0.1)
    wait_restarted(deployment, "svc-a", restarts + 1, RESTART_BOUND_S)
    assert seen in (["serving", "restarting", "serving"], ["restarting", "serving"]), seen


SECRET = "s3cret-token-for-svc-c"
ADDRESS = "0x7f3a2b1c9d40"


def test_a_failing_step_ends_its_requests_with_internal_only(deployment, targets,
                                                             supervisor):
    restarts = service_rows(deployment)["svc-c"]["restarts"]
    ray.get(_actor(supervisor, "svc-c").inject_fault.remote(
        "step", 1, message=f"boom at {ADDRESS} with {SECRET}"))
    with pytest.raises(grpc.RpcError) as err:
        stream_tokens(targets["svc-c"], token_of("svc-c"), [1, 7, 8], max_tokens=8)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details()
    assert SECRET not in details and ADDRESS not in details and "0x" not in details
    # The service stayed up: it serves the next request, and was not restarted.
    assert len(stream_tokens(targets["svc-c"], token_of("svc-c"), [1, 7, 8],
                             max_tokens=8, ignore_eos=True)) == 8
    assert len(stream_tokens(targets["svc-a"], token_of("svc-a"), [1, 7, 8],
                             max_tokens=8, ignore_eos=True)) == 8
    assert service_rows(deployment)["svc-c"]["restarts"] == restarts
    assert service_rows(deployment)["svc-c"]["stats"].kv_blocks_used == 0


def test_an_engine_that_keeps_failing_is_restarted(deployment, targets, supervisor,
                                                   tmp_path):
    from colocate.service.async_engine import MAX_CONSECUTIVE_STEP_FAILURES

    restarts = service_rows(deployment)["svc-c"]["restarts"]
    ray.get(_actor(supervisor, "svc-c").inject_fault.remote(
        "step", MAX_CONSECUTIVE_STEP_FAILURES, message=SECRET))
    codes = [call_status(lambda: stream_tokens(targets["svc-c"], token_of("svc-c"),
                                               [1, 9], max_tokens=4))
             for _ in range(MAX_CONSECUTIVE_STEP_FAILURES)]
    # The last failure kills the engine loop: that request is UNAVAILABLE.
    assert codes[:-1] == [grpc.StatusCode.INTERNAL] * (MAX_CONSECUTIVE_STEP_FAILURES - 1)
    assert codes[-1] in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    took = wait_restarted(deployment, "svc-c", restarts + 1, RESTART_BOUND_S)
    record(tmp_path, "engine_restart", dict(healthy_after_s=round(took, 2)))
    assert len(stream_tokens(targets["svc-c"], token_of("svc-c"), [1, 9], max_tokens=4,
                             ignore_eos=True)) == 4


def test_one_failed_health_check_is_forgiven(deployment, supervisor):
    restarts = service_rows(deployment)["svc-a"]["restarts"]
    ray.get(_actor(supervisor, "svc-a").inject_fault.remote("ping_fail", 1))
    time.sleep(HEALTH_INTERVAL_S * (FAILED_CHECKS + 3))
    row = service_rows(deployment)["svc-a"]
    assert row["restarts"] == restarts and row["state"] == "running"


@pytest.mark.parametrize("kind", ["ping_fail", "ping_hang"])
def test_repeated_failed_or_hung_health_checks_restart(deployment, supervisor, targets,
                                                        kind, tmp_path):
    restarts = service_rows(deployment)["svc-a"]["restarts"]
    ray.get(_actor(supervisor, "svc-a").inject_fault.remote(
        kind, FAILED_CHECKS, seconds=HEALTH_TIMEOUT_S + 1.0))
    took = wait_restarted(deployment, "svc-a", restarts + 1, RESTART_BOUND_S)
    record(tmp_path, f"restart_after_{kind}", dict(healthy_after_s=round(took, 2)))
    assert len(stream_tokens(targets["svc-a"], token_of("svc-a"), [1, 4], max_tokens=3,
                             ignore_eos=True)) == 3


def test_fault_injection_is_refused_without_the_test_hooks():
    from colocate.service import test_hooks

    assert test_hooks.load_test_hooks(None) is None      # production: no hooks at all
    assert test_hooks.ping_allowed(None)
    with pytest.raises(PermissionError, match="test_hooks"):
        test_hooks.arm(None, "step", 1, "x", 0.0)
    with pytest.raises(ValueError, match="module:factory"):
        test_hooks.load_test_hooks("tests.faults.FaultInjector")
