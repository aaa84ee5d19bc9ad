"""The gRPC service over a fake-runner engine: streaming, auth, status codes,
cancellation."""
from __future__ import annotations

import threading

import grpc
import pytest

from colocate.sampling_params import SamplingParams
from colocate.serving.engine_protocol import EngineStats
from colocate.serving.proto_gen import colocate_pb2 as pb
from tests.serving.conftest import TOKEN
from tests.serving.helpers import (GatedRunner, SlowRunner, expected_tokens, make_llm_engine,
                                   run_direct, wait_for_thread_count, wait_until)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_stream_matches_direct_engine(make_service):
    client = make_service().client()
    prompt = [11, 22, 33, 44, 55, 66]
    deltas = list(client.generate(prompt, max_tokens=9, request_id="mine"))
    assert [t for d in deltas for t in d.token_ids] == run_direct(prompt, SamplingParams(max_tokens=9))
    assert all(len(d.token_ids) == 1 for d in deltas)         # one message per token
    assert all(d.request_id == "mine" for d in deltas)
    assert [d.finish_reason for d in deltas] == [None] * 8 + ["length"]
    assert deltas[-1].usage.prompt_tokens == 6 and deltas[-1].usage.completion_tokens == 9
    assert all(d.usage is None for d in deltas[:-1])


def test_stop_token_and_logprobs(make_service):
    client = make_service().client()
    prompt = [3, 1, 4, 1, 5]
    want = expected_tokens(prompt, 10)
    deltas = list(client.generate(prompt, max_tokens=10, stop_token_ids=[want[3]], logprobs=0))
    assert [t for d in deltas for t in d.token_ids] == want[:4]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == want[3]
    assert all(d.logprobs == [{d.token_ids[0]: 0.0}] for d in deltas)


@pytest.mark.parametrize("token", [None, "", "wrong", TOKEN + "x", TOKEN[:-1]])
@pytest.mark.parametrize("call", ["generate", "model_info", "health"])
def test_missing_or_wrong_token_is_unauthenticated(make_service, token, call):
    service = make_service()
    client = service.client(token)
    actions = {"generate": lambda: list(client.generate([1, 2])),
               "model_info": client.model_info, "health": client.health}
    err = rpc_error(actions[call])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.details()
    if token:
        assert token not in err.details()
    assert not service.llm_engine.has_unfinished_requests()


def test_wrong_scheme_is_unauthenticated(make_service):
    client = make_service().client()
    client._metadata = (("authorization", f"Basic {TOKEN}"),)
    err = rpc_error(client.health)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and TOKEN not in err.details()


def test_every_tenant_token_is_accepted(make_service):
    service = make_service()
    for token in ("token-team-a", "token-team-b"):
        assert service.client(token).health().status == pb.HealthResponse.SERVING


BAD_FIELDS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 1.5}, "top_p must be <= 1.0, got 1.5"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"temperature": float("nan")}, "temperature must be finite"),
]


@pytest.mark.parametrize("sampling,message", BAD_FIELDS)
def test_bad_sampling_field_is_invalid_argument(make_service, sampling, message):
    service = make_service()
    err = rpc_error(lambda: list(service.client().generate([1, 2, 3], **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    assert "Traceback" not in err.details()
    assert not service.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt,sampling,message", [
    (list(range(60)), {"max_tokens": 10}, "exceeds max_model_len (64)"),
    ([1, 1000], {}, "prompt token id 1000 is outside the vocabulary"),
    ([-1], {}, "prompt token id -1"),
    ([], {}, "prompt must not be empty"),
    ("text needs a tokenizer", {}, "tokenizer"),
])
def test_bad_prompt_is_invalid_argument(make_service, prompt, sampling, message):
    client = make_service(make_llm_engine(max_model_len=64)).client()
    err = rpc_error(lambda: list(client.generate(prompt, **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_request_without_prompt_is_invalid_argument(make_service):
    client = make_service().client()
    err = rpc_error(lambda: list(client._stub.Generate(pb.GenerateRequest(),
                                                       metadata=client._metadata)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt or prompt_token_ids must be set" in err.details()


def test_request_id_is_per_tenant(make_service):
    service = make_service(make_llm_engine(SlowRunner()))
    a, b = service.client("token-team-a"), service.client("token-team-b")
    running = a.generate([1, 2, 3], max_tokens=400, request_id="same")
    next(running)
    # Another tenant may use the same id; the same tenant may not while it runs.
    assert len(list(b.generate([4, 5], max_tokens=3, request_id="same"))) == 3
    err = rpc_error(lambda: list(a.generate([4, 5], max_tokens=3, request_id="same")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()
    running.close()


def test_queue_full_is_resource_exhausted(make_service):
    runner = GatedRunner()
    service = make_service(make_llm_engine(runner), max_queued_requests=1)
    first = service.engine.submit([1, 2], SamplingParams(max_tokens=2))
    assert runner.entered.wait(5)         # the loop is held inside a step
    second = service.engine.submit([3, 4], SamplingParams(max_tokens=2))
    err = rpc_error(lambda: list(service.client().generate([5, 6], max_tokens=2)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_requests" in err.details()
    runner.gate.set()
    list(first), list(second)


def test_cancel_mid_stream_frees_blocks_and_threads(make_service):
    baseline = threading.active_count()
    service = make_service(make_llm_engine(SlowRunner()))
    pool = service.llm_engine.kv.pool
    stream = service.client().generate(list(range(1, 40)), max_tokens=400)
    for _ in range(3):
        assert not next(stream).finished
    assert pool.num_used_blocks >= 10
    stream.close()                        # cancels the call
    wait_until(lambda: pool.num_used_blocks == 0, what="blocks freed after cancel")
    wait_until(lambda: not service.llm_engine.has_unfinished_requests(), what="request aborted")
    service.stop()
    assert pool.num_used_blocks == 0
    wait_for_thread_count(baseline)


def test_server_stop_with_a_stream_open_frees_everything(make_service):
    baseline = threading.active_count()
    service = make_service(make_llm_engine(SlowRunner()))
    stream = service.client().generate([7, 8, 9], max_tokens=400)
    next(stream)
    service.server.stop(grace=0)
    wait_until(lambda: service.llm_engine.kv.pool.num_used_blocks == 0,
               what="blocks freed after server stop")
    service.stop()
    wait_for_thread_count(baseline)


class BrokenEngine:
    """An EngineProtocol whose generate fails in a way the servicer did not expect."""

    def start(self):
        pass

    def generate(self, prompt, params, request_id=None):
        raise RuntimeError("secret internals at /srv/model/weights")

    def abort(self, request_id):
        pass

    def check_health(self):
        pass

    def stats(self):
        return EngineStats()

    def shutdown(self):
        pass


def test_unexpected_error_is_internal_and_leaks_nothing(make_service):
    client = make_service(engine=BrokenEngine()).client()
    err = rpc_error(lambda: list(client.generate([1, 2])))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == "internal error in Generate"


def test_model_info_and_health(make_service):
    service = make_service(make_llm_engine(num_blocks=65, max_model_len=256))
    client = service.client()
    info = client.model_info()
    assert (info.service_name, info.model_name) == ("chat-test", "fake")
    assert (info.max_model_len, info.block_size, info.kv_cache_tokens, info.vocab_size) == \
        (256, 4, 256, 1000)
    assert not info.HasField("weight_bytes")
    health = client.health()
    assert health.status == pb.HealthResponse.SERVING
    assert (health.kv_blocks_used, health.kv_blocks_total) == (0, 64)
    service.engine.shutdown()
    health = client.health()
    assert health.status == pb.HealthResponse.NOT_SERVING and "shut down" in health.message
    err = rpc_error(lambda: list(client.generate([1, 2])))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
