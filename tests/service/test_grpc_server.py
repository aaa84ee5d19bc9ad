"""The Generation service over a fake-runner engine: streaming and unary
generation, status codes, model info and stats. Auth, health and call
lifetimes have their own files."""
from __future__ import annotations

import grpc
import pytest

from colocate.sampling_params import SamplingParams
from colocate.service.engine_protocol import EngineStats
from colocate.service.proto_gen import colocate_pb2 as pb
from tests.service.helpers import (GatedRunner, SlowRunner, expected_tokens, make_llm_engine,
                                   rpc_error, run_direct, wait_until)


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


class BrokenEngine:
    """An EngineProtocol whose generate fails in a way the servicer did not expect."""

    def start(self):
        pass

    def generate(self, prompt, params, request_id=None):
        raise RuntimeError("secret internals at /srv/model/weights")

    def abort(self, request_id):
        pass

    def tokenize(self, text):
        raise RuntimeError("secret internals in the tokenizer")

    def detokenize(self, token_ids, skip_special_tokens=True):
        raise RuntimeError("secret internals in the tokenizer")

    def check_health(self):
        pass

    def stats(self):
        return EngineStats()

    def shutdown(self):
        pass


@pytest.mark.parametrize("call,method", [
    (lambda c: list(c.generate([1, 2])), "Generate"),
    (lambda c: c.complete([1, 2]), "Complete"),
    (lambda c: c.tokenize("hi"), "Tokenize"),
])
def test_unexpected_error_is_internal_and_leaks_nothing(make_service, call, method):
    client = make_service(engine=BrokenEngine()).client()
    err = rpc_error(lambda: call(client))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == f"internal error in {method}"


def test_complete_is_the_stream_joined(make_service):
    client = make_service().client()
    prompt = [3, 1, 4, 1, 5]
    want = expected_tokens(prompt, 10)
    result = client.complete(prompt, max_tokens=10, stop_token_ids=[want[6]], logprobs=0,
                             request_id="whole")
    streamed = list(client.generate(prompt, max_tokens=10, stop_token_ids=[want[6]]))
    assert result.token_ids == want[:7] == [t for d in streamed for t in d.token_ids]
    assert (result.finish_reason, result.stop_reason) == ("stop", want[6])
    assert result.request_id == "whole"
    assert result.logprobs == [{t: 0.0} for t in want[:7]]
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (5, 7)


@pytest.mark.parametrize("sampling,message", BAD_FIELDS[:3])
def test_complete_refuses_bad_fields_like_generate(make_service, sampling, message):
    err = rpc_error(lambda: make_service().client().complete([1, 2, 3], **sampling))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()


@pytest.mark.parametrize("request_,message", [
    (pb.TokenizeRequest(), "text or token_ids must be set"),
    (pb.TokenizeRequest(text=""), "text must not be empty"),
    (pb.TokenizeRequest(text="hello"), "no tokenizer.json"),
    (pb.TokenizeRequest(token_ids=pb.TokenIds(ids=[5, 1000])), "token_ids[1] = 1000"),
    (pb.TokenizeRequest(token_ids=pb.TokenIds(ids=[-3])), "token_ids[0] = -3"),
    (pb.TokenizeRequest(token_ids=pb.TokenIds(ids=[5])), "no tokenizer.json"),
])
def test_bad_tokenize_is_invalid_argument(make_service, request_, message):
    client = make_service().client()
    err = rpc_error(lambda: client._stub.Tokenize(request_, metadata=client._metadata))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_model_info_and_stats(make_service):
    service = make_service(make_llm_engine(SlowRunner(), num_blocks=65, max_model_len=256))
    client = service.client()
    info = client.model_info()
    assert (info.service_name, info.model_name) == ("chat-test", "fake")
    assert (info.max_model_len, info.block_size, info.kv_cache_tokens, info.vocab_size) == \
        (256, 4, 256, 1000)
    assert not info.HasField("weight_bytes")
    stats = client.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used,
            stats.kv_blocks_total) == (0, 0, 0, 64)
    stream = client.generate(list(range(1, 10)), max_tokens=200)
    next(stream)
    wait_until(lambda: client.stats().kv_blocks_used >= 3, what="stats of a running request")
    assert client.stats().num_running == 1
    stream.close()


def test_stopped_engine_is_unavailable(make_service):
    service = make_service()
    service.engine.shutdown()
    client = service.client()
    for call in (lambda: list(client.generate([1, 2])), lambda: client.complete([1, 2])):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shut down" in err.details()


