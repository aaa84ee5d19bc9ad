"""Random JSON bodies at the OpenAI-compatible HTTP door over the tiny model (with a
chat template, so chat bodies reach the rendering, the engine and the sampler):
whatever a client sends, the answer is a success or a client error in OpenAI's
shape (400, 404, 413, 429), never a 500, a hang or a dead server, and nothing is
left in the engine afterwards. Streamed answers are read to `data: [DONE]`."""
from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from colocate.service.async_engine import AsyncEngine
from tests.reliability.fuzz_helpers import fuzz_settings, tiny_chat_llm
from tests.service.served import TOKEN, ServiceStarter

MAX_MODEL_LEN = 96            # room for a short chat (ChatML costs the tiny tokenizer ~40)
MAX_REQUEST_BYTES = 16 * 1024
CLIENT_ERRORS = {400, 404, 413, 429}
FUZZ = fuzz_settings(60)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    llm = tiny_chat_llm(tiny_model_dir, tmp_path_factory, MAX_MODEL_LEN, 512)
    starter = ServiceStarter("http-fuzz")
    service = starter.start(llm.engine, engine=AsyncEngine(llm.engine, max_queued_requests=8),
                            http=dict(names=["tiny"], max_request_bytes=MAX_REQUEST_BYTES))
    yield service
    starter.stop_all()


# ---- strategies -------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
number = st.one_of(st.floats(0.0, 2.0), st.integers(-3, 40), st.sampled_from(
    [5e-324, 1e300, -1e300, float("nan"), float("inf"), 2**63, -2**63, 2**64]))
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), number, text),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(text, inner, max_size=3)), max_leaves=6)
# Values the server accepts, so that a body with one or two wild fields among sane
# ones gets past validation often enough to reach the engine and the sampler.
SANE = {
    "model": st.just("tiny"), "max_tokens": st.integers(1, 8),
    "max_completion_tokens": st.integers(1, 8), "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0), "seed": st.integers(0, 2**31), "n": st.just(1),
    "stop": st.one_of(text.filter(bool), st.lists(text.filter(bool), max_size=3)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "min_tokens": st.integers(0, 1),
    "repetition_penalty": st.floats(0.5, 2), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 2047), max_size=3),
}
WILD_FIELDS = sorted(SANE) + ["stream", "stream_options", "logprobs", "top_logprobs",
                              "messages", "prompt", "echo", "tools", "best_of"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": text})
wild_message = st.fixed_dictionaries({"role": json_value, "content": json_value})
prompt = st.one_of(text.filter(bool), st.lists(st.integers(0, 2047), min_size=1, max_size=8))


@st.composite
def body(draw, chat: bool) -> dict:
    out = draw(st.fixed_dictionaries({}, optional=SANE))
    if draw(st.booleans()):
        out["stream"] = True
        if draw(st.booleans()):
            out["stream_options"] = {"include_usage": draw(st.booleans())}
    if draw(st.booleans()):
        if chat:
            out["logprobs"], out["top_logprobs"] = True, draw(st.integers(0, 5))
        else:
            out["logprobs"] = draw(st.integers(0, 5))
    if chat:
        out["messages"] = draw(st.lists(st.one_of(message, wild_message), min_size=1,
                                        max_size=3))
    else:
        out["prompt"] = draw(prompt)
    for name in draw(st.lists(st.sampled_from(WILD_FIELDS), max_size=2)):
        if draw(st.integers(0, 4)):
            out[name] = draw(st.one_of(json_value, number))
        else:
            out.pop(name, None)           # a required field missing, now and then
    return out


def post(service, path: str, raw: bytes) -> tuple[int, list[dict]]:
    """The status and every JSON object of the answer (one, or a stream's events)."""
    conn = http.client.HTTPConnection(service.http.host, service.http.port, timeout=60)
    try:
        conn.request("POST", path, body=raw, headers={"Authorization": f"Bearer {TOKEN}"})
        response = conn.getresponse()
        data = response.read().decode()
    finally:
        conn.close()
    if response.getheader("Content-Type", "").startswith("text/event-stream"):
        events = [line[len("data: "):] for line in data.split("\n\n") if line]
        assert events[-1] == "[DONE]", data
        return response.status, [json.loads(e) for e in events[:-1]]
    return response.status, [json.loads(data)]


def check(service, path: str, raw: bytes) -> int:
    status, objects = post(service, path, raw)
    assert status == 200 or status in CLIENT_ERRORS, (status, objects)
    for obj in objects:
        if "error" in obj:
            assert obj["error"]["code"] in CLIENT_ERRORS, obj
    event(str(status))
    assert not service.llm_engine.has_unfinished_requests()
    return status


@FUZZ
@given(b=body(chat=True))
@example(b={"messages": [{"role": "user", "content": "{{ 7 * 7 }}"}], "max_tokens": 4})
@example(b={"messages": [{"role": "user", "content": "hi"}], "temperature": 1e300,
            "top_logprobs": 5, "logprobs": True, "stream": True})
def test_random_chat_bodies_never_get_a_500(served, b):
    check(served, "/v1/chat/completions", json.dumps(b).encode())


@FUZZ
@given(b=body(chat=False))
@example(b={"prompt": [1, 2], "repetition_penalty": 5e-324, "max_tokens": 8, "seed": 3})
@example(b={"prompt": "x", "logprobs": 5, "stream": True,
            "stream_options": {"include_usage": True}})
def test_random_completion_bodies_never_get_a_500(served, b):
    check(served, "/v1/completions", json.dumps(b).encode())


@settings(FUZZ, max_examples=40)
@given(raw=st.one_of(st.binary(max_size=64), st.binary(min_size=MAX_REQUEST_BYTES + 1,
                                                       max_size=MAX_REQUEST_BYTES + 8),
                     json_value.map(lambda v: json.dumps(v).encode())))
def test_random_bytes_never_get_a_500(served, raw):
    assert check(served, "/v1/chat/completions", raw) in CLIENT_ERRORS
