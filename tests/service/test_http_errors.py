"""The HTTP door's refusals, limits and lifetimes over the fake runner, in raw HTTP
(and the `openai` package where it shows what a client sees): every error in
OpenAI's JSON shape with the status a client expects, a full queue 429, draining
503, a disconnect mid-stream aborting the request and freeing its blocks."""
from __future__ import annotations

import http.client
import json

import openai
import pytest

from colocate.sampling_params import SamplingParams
from tests.reliability.security_fixtures import engine_with_tokenizer
from tests.service.helpers import GatedRunner, SlowRunner, make_llm_engine, wait_until
from tests.service.served import TOKEN, with_chat_template

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def chat_dir(tiny_model_dir, tmp_path_factory):
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("chat") / "tiny")


def call(service, method: str, path: str, body=None, token: str | None = TOKEN,
         raw: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(service.http.host, service.http.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def assert_error(answer, status: int, param: str | None = None, words: str = "") -> None:
    code, body = answer
    assert code == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["param"] == param and words in error["message"]


def test_health_is_open_and_models_needs_a_tenant(make_service):
    service = make_service(http=dict(names=["fake"]))
    assert call(service, "GET", "/health", token=None) == (200, {"status": "ok"})
    assert_error(call(service, "GET", "/v1/models", token=None), 401, words="missing bearer")
    assert_error(call(service, "GET", "/v1/models", token="wrong"), 401, words="invalid bearer")
    # another tenant of ANOTHER service is a stranger here
    assert_error(call(service, "GET", "/v1/models", token="token-of-another-service"), 401)
    code, body = call(service, "GET", "/v1/models")
    assert code == 200 and [m["id"] for m in body["data"]] == ["fake"]
    assert "wrong" not in json.dumps(call(service, "GET", "/v1/models", token="wrong")[1])


@pytest.mark.parametrize("body,status,param,words", [
    ({"prompt": [1, 2], "temperature": -1}, 400, "temperature", "temperature must be >= 0.0"),
    ({"prompt": [1, 2], "top_p": 2}, 400, "top_p", "top_p must be <= 1.0"),
    ({"prompt": [1, 2], "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1"),
    ({"prompt": [1, 2], "max_tokens": 5000}, 400, "prompt", "exceeds max_model_len"),
    ({"prompt": [1, 2], "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": [1, 2], "stream": "yes"}, 400, "stream", "stream must be a boolean"),
    ({"prompt": [1, 2], "logprobs": 9}, 400, "logprobs", "logprobs must be in [0, 5]"),
    ({"prompt": [1, 2], "stream_options": {"include_usage": True}}, 400, "stream_options",
     "needs stream: true"),
    ({"prompt": [1, 2], "echo": True}, 400, "echo", "not supported"),
    ({"prompt": [[1], [2]]}, 400, "prompt", "one prompt per request"),
    ({"prompt": [1, 5000]}, 400, "prompt", "outside the vocabulary"),
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": [1, 2], "model": "other"}, 404, "model", "does not exist"),
    ({"prompt": [1, 2], "model": 7}, 400, "model", "model must be a string"),
])
def test_bad_completion_bodies_name_the_field(make_service, body, status, param, words):
    service = make_service(http=dict(names=["fake"]))
    assert_error(call(service, "POST", "/v1/completions", body), status, param, words)
    assert not service.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "only text parts"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"messages": HELLO, "response_format": {"type": "json_object"}}, "response_format", ""),
])
def test_bad_chat_bodies_name_the_field(make_service, chat_dir, body, param, words):
    service = make_service(engine_with_tokenizer(chat_dir), http=dict(names=["fake"]))
    assert_error(call(service, "POST", "/v1/chat/completions", body), 400, param, words)


def test_a_model_without_a_chat_template_says_so(make_service, tiny_model_dir):
    service = make_service(engine_with_tokenizer(tiny_model_dir), http=dict(names=["fake"]))
    assert_error(call(service, "POST", "/v1/chat/completions", {"messages": HELLO}), 400,
                 words="no chat template")


def test_bodies_that_are_not_json_objects_too_large_or_misrouted(make_service):
    service = make_service(http=dict(names=["fake"], max_request_bytes=1024))
    assert_error(call(service, "POST", "/v1/completions", raw=b"{nope"), 400, words="JSON")
    assert_error(call(service, "POST", "/v1/completions", raw=b"[1, 2]"), 400,
                 words="JSON object")
    assert_error(call(service, "POST", "/v1/completions", raw=b"\xff\xfe"), 400)
    assert_error(call(service, "POST", "/v1/completions", {"prompt": "x" * 2000}), 413,
                 words="over 1024 bytes")
    assert call(service, "GET", "/v1/nothing")[0] == 404
    assert call(service, "GET", "/v1/completions")[0] == 405


def test_a_full_queue_is_429(make_service):
    runner = GatedRunner()
    service = make_service(make_llm_engine(runner), max_queued_requests=1,
                           http=dict(names=["fake"]))
    first = service.engine.submit([1, 2], SamplingParams(max_tokens=2))
    assert runner.entered.wait(5)         # the loop is held inside a step
    second = service.engine.submit([3, 4], SamplingParams(max_tokens=2))
    with pytest.raises(openai.RateLimitError) as err:
        service.openai().completions.create(model="fake", prompt=[5, 6], max_tokens=2)
    assert "max_queued_requests=1" in err.value.message
    runner.gate.set()
    assert list(first)[-1].finished and list(second)[-1].finished


def test_too_many_in_flight_is_429(make_service):
    runner = GatedRunner()
    service = make_service(make_llm_engine(runner), http=dict(names=["fake"], max_in_flight=1))
    conn = http.client.HTTPConnection(service.http.host, service.http.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": [1, 2], "max_tokens": 2}),
                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert runner.entered.wait(5)         # the first request is in the engine
    assert_error(call(service, "POST", "/v1/completions", {"prompt": [3], "max_tokens": 2}),
                 429, words="in flight")
    runner.gate.set()
    assert conn.getresponse().status == 200
    conn.close()


def test_draining_is_503_and_health_says_so(make_service):
    service = make_service(http=dict(names=["fake"]))
    service.engine.drain(0.0)
    assert_error(call(service, "POST", "/v1/completions", {"prompt": [1, 2]}), 503,
                 words="shutting down")
    assert call(service, "GET", "/health", token=None)[0] == 503


def test_a_disconnect_mid_stream_frees_the_blocks(make_service):
    service = make_service(make_llm_engine(SlowRunner(0.01)), http=dict(names=["fake"]))
    conn = http.client.HTTPConnection(service.http.host, service.http.port, timeout=30)
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                 body=json.dumps({"prompt": [1, 2, 3], "max_tokens": 400, "ignore_eos": True,
                                  "stream": True}))
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: {")       # tokens are flowing
    wait_until(lambda: service.engine.stats().kv_blocks_used > 0, what="blocks in use")
    conn.sock.close()                    # the client goes away mid-stream
    conn.close()
    wait_until(lambda: not service.llm_engine.has_unfinished_requests()
               and service.engine.stats().kv_blocks_used == 0, what="blocks back")
    assert service.llm_engine.kv.num_used_blocks == 0


def test_refusals_are_counted_by_reason(make_service):
    from colocate.metrics.rejections import RejectionCounter

    counter = RejectionCounter()
    service = make_service(make_llm_engine(max_model_len=64),
                           http=dict(names=["fake"], on_reject=counter.add))
    call(service, "GET", "/v1/models", token="wrong")
    call(service, "POST", "/v1/completions", {"prompt": [1], "temperature": -1})
    call(service, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 100})
    assert call(service, "POST", "/v1/completions", {"prompt": [1], "max_tokens": 2})[0] == 200
    assert counter.counts() == {"auth": 1, "invalid": 1, "too_long": 1, "overloaded": 0}


def test_a_failing_engine_is_a_500_without_detail_plain_or_streamed(make_service):
    from tests.service.helpers import FailingRunner

    service = make_service(make_llm_engine(FailingRunner()), http=dict(names=["fake"]))
    assert_error(call(service, "POST", "/v1/completions", {"prompt": [1, 2]}), 500,
                 words="internal error")
    conn = http.client.HTTPConnection(service.http.host, service.http.port, timeout=30)
    conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                 body=json.dumps({"prompt": [1, 2], "stream": True}))
    response = conn.getresponse()
    events = response.read().decode().split("\n\n")
    conn.close()
    assert response.status == 200 and events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3][len("data: "):])["error"]["message"] == "internal error"
    assert "simulated" not in "".join(events)
