"""Limits on what one caller can make a service hold: the size of a request message,
the calls in flight at once; and no reflection service to map the port with."""
from __future__ import annotations

import grpc
import pytest

from colocate.client import Client
from colocate.service.proto_gen import colocate_pb2 as pb
from tests.reliability.security_fixtures import TOKEN, start_server  # noqa: F401  (fixture)
from tests.service.helpers import SlowRunner, make_llm_engine, rpc_error, wait_until

LIMIT = 64 * 1024

# Calls whose request message carries ~`n` bytes of payload.
OVERSIZED = {
    "Generate(text)": lambda c, n: list(c.generate("x" * n)),
    "Complete(ids)": lambda c, n: c.complete([300] * (n // 2)),   # 2-byte varints
    "Tokenize": lambda c, n: c.tokenize("y" * n),
    "Detokenize": lambda c, n: c.detokenize([300] * (n // 2)),
}


@pytest.mark.parametrize("call", sorted(OVERSIZED))
def test_a_request_over_the_limit_is_refused_and_the_server_carries_on(start_server, call):
    served = start_server(max_request_bytes=LIMIT)
    client = Client(served.target, TOKEN, timeout=10)
    err = rpc_error(lambda: OVERSIZED[call](client, 2 * LIMIT))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Under the limit the same call is read and judged on its content instead.
    assert list(client.generate([1, 2, 3], max_tokens=3))[-1].finish_reason == "length"
    assert client.model_info().service_name == "secure"
    assert client.health() == "SERVING"
    assert not served.llm_engine.has_unfinished_requests()
    client.close()


def test_a_message_just_under_the_limit_is_read(start_server):
    served = start_server(max_request_bytes=LIMIT)
    with Client(served.target, TOKEN, timeout=10) as client:
        # 20 KiB of ids: read fine, then refused for its length by the engine.
        err = rpc_error(lambda: client.complete([300] * 10_000))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_model_len" in err.details()


def test_the_default_limit_is_4_mib(start_server):
    served = start_server()
    with Client(served.target, TOKEN, timeout=30) as client:
        err = rpc_error(lambda: client.tokenize("z" * (4 * 1024 * 1024 + 1)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.model_info().model_name == "fake"


def test_calls_beyond_max_concurrent_rpcs_are_refused(start_server):
    # Slow steps keep the streams open while the test counts them.
    served = start_server(make_llm_engine(SlowRunner(delay=0.01)), max_concurrent_rpcs=3)
    client = Client(served.target, TOKEN, timeout=30)
    streams = [client.generate([i + 1, 2, 3], max_tokens=400) for i in range(3)]
    for s in streams:
        next(s)                                   # each call is running on the server
    for call in (client.model_info, lambda: list(client.generate([9], max_tokens=2)),
                 client.health):
        assert rpc_error(call).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    streams[0].close()                            # cancels the call: a slot frees up

    def admitted() -> bool:
        try:
            return client.model_info().service_name == "secure"
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False

    wait_until(admitted, what="a slot after cancelling a stream")
    for s in streams[1:]:
        s.close()
    wait_until(lambda: not served.llm_engine.has_unfinished_requests(), what="aborts")
    client.close()


REFLECTION = ["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
              "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"]


@pytest.mark.parametrize("method", REFLECTION)
@pytest.mark.parametrize("token", [None, TOKEN])
def test_reflection_is_not_served(start_server, method, token):
    served = start_server()
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(served.target) as channel:
        # A list_services request (field 7, empty string), hand-encoded: the
        # grpcio-reflection package is not a dependency.
        call = channel.stream_stream(method)(iter([b"\x3a\x00"]), metadata=metadata,
                                            timeout=10)
        err = rpc_error(lambda: list(call))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


def test_only_generation_and_health_are_served(start_server):
    served = start_server()
    with grpc.insecure_channel(served.target) as channel:
        unknown = channel.unary_unary("/colocate.v1.Admin/Shutdown")
        err = rpc_error(lambda: unknown(b"", metadata=(("authorization", f"Bearer {TOKEN}"),),
                                        timeout=10))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert {s.name for s in pb.DESCRIPTOR.services_by_name.values()} == {"Generation"}
