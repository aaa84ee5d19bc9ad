"""Bearer-token auth: every Generation call needs a token of one of THIS
service's tenants; health needs none."""
from __future__ import annotations

import grpc
import pytest

from colocate.client import Client
from tests.service.conftest import TENANTS, TOKEN
from tests.service.helpers import rpc_error

# Every Generation rpc, called through the client.
CALLS = {
    "Generate": lambda c: list(c.generate([1, 2])),
    "Complete": lambda c: c.complete([1, 2]),
    "Tokenize": lambda c: c.tokenize("hello"),
    "Detokenize": lambda c: c.detokenize([1, 2]),
    "GetModelInfo": lambda c: c.model_info(),
    "GetStats": lambda c: c.stats(),
}


def assert_refused(call, client: Client, token: str | None) -> None:
    err = rpc_error(lambda: call(client))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.details()
    if token:
        assert token not in err.details()       # never echo a secret


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()])
@pytest.mark.parametrize("method", sorted(CALLS))
def test_missing_or_wrong_token_is_unauthenticated(make_service, token, method):
    service = make_service()
    assert_refused(CALLS[method], service.client(token), token)
    assert not service.llm_engine.has_unfinished_requests()


def test_wrong_scheme_is_unauthenticated(make_service):
    client = make_service().client()
    client._metadata = (("authorization", f"Basic {TOKEN}"),)
    assert_refused(CALLS["GetModelInfo"], client, TOKEN)


def test_every_tenant_token_is_accepted(make_service):
    service = make_service()
    for token in TENANTS:
        assert service.client(token).model_info().service_name == "chat-test"


def test_a_token_of_another_service_is_unauthenticated(make_service):
    a = make_service(tenants={"token-of-a": "team-a"}, name="svc-a")
    b = make_service(tenants={"token-of-b": "team-b"}, name="svc-b")
    assert a.client("token-of-a").model_info().service_name == "svc-a"
    assert b.client("token-of-b").model_info().service_name == "svc-b"
    for method in ("Generate", "GetModelInfo"):
        assert_refused(CALLS[method], a.client("token-of-b"), "token-of-b")
        assert_refused(CALLS[method], b.client("token-of-a"), "token-of-a")


@pytest.mark.parametrize("token", [None, "wrong"])
def test_health_needs_no_token(make_service, token):
    client = make_service().client(token)
    assert client.health() == "SERVING"
    assert next(client.watch_health()) == "SERVING"
