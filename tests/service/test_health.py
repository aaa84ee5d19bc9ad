"""The standard grpc.health.v1.Health service: Check and Watch."""
from __future__ import annotations

import grpc
import pytest

from colocate.service.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
from colocate.service.proto_gen import health_pb2
from tests.service.helpers import FailingRunner, make_llm_engine, rpc_error

KNOWN = ["", "colocate.v1.Generation", "chat-test"]


@pytest.mark.parametrize("name", KNOWN)
def test_check_is_serving_then_not_serving_after_shutdown(make_service, name):
    service = make_service()
    client = service.client(None)
    assert client.health(name) == "SERVING"
    service.engine.shutdown()
    assert client.health(name) == "NOT_SERVING"


def test_check_of_an_unknown_service_is_not_found(make_service):
    err = rpc_error(lambda: make_service().client(None).health("chat-other"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "chat-other" in err.details()


def test_engine_failure_is_not_serving(make_service):
    service = make_service(make_llm_engine(FailingRunner()))
    client = service.client()
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):           # the loop dies on the last
        rpc_error(lambda: list(client.generate([1, 2, 3])))
    assert client.health() == "NOT_SERVING"


def test_watch_sends_the_status_then_its_change(make_service):
    service = make_service()
    watch = service.client(None).watch_health("chat-test", timeout=10)
    assert next(watch) == "SERVING"
    service.engine.shutdown()
    assert next(watch) == "NOT_SERVING"
    watch.close()


def test_watch_of_an_unknown_service_says_so_and_stays_open(make_service):
    watch = make_service().client(None).watch_health("chat-other", timeout=10)
    assert next(watch) == "SERVICE_UNKNOWN"
    watch.close()


def test_server_stop_ends_watches_with_not_serving(make_service):
    service = make_service()
    watch = service.client(None).watch_health(timeout=10)
    assert next(watch) == "SERVING"
    service.server.stop(grace=5)          # must not wait out the grace on the watch
    assert list(watch) == ["NOT_SERVING"]


def test_wire_names_are_the_standard_ones():
    # Probes (grpc_health_probe, Kubernetes) call exactly these paths and numbers.
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert service.full_name == "grpc.health.v1.Health"
    assert [m.name for m in service.methods] == ["Check", "Watch"]
    assert health_pb2.DESCRIPTOR.name == "grpc/health/v1/health.proto"
    status = health_pb2.HealthCheckResponse.ServingStatus
    assert [(n, status.Value(n)) for n in status.keys()] == \
        [("UNKNOWN", 0), ("SERVING", 1), ("NOT_SERVING", 2), ("SERVICE_UNKNOWN", 3)]
