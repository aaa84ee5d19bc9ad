"""The Chat RPC over the fake runner behind a real tokenizer: a conversation is
rendered through the model's chat template and streamed as Generate streams;
a model without a template is FAILED_PRECONDITION; bad messages name the field.
SmolLM2's real replies, equal to LLM.chat, are in test_http_openai.py."""
from __future__ import annotations

import grpc
import pytest

from colocate.cli import main
from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import AsyncEngine
from tests.reliability.security_fixtures import engine_with_tokenizer
from tests.service.helpers import rpc_error
from tests.service.served import TOKEN, with_chat_template

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def chat_dir(tiny_model_dir, tmp_path_factory):
    return with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("chat") / "tiny")


def test_chat_streams_the_rendered_conversation(make_service, chat_dir):
    llm_engine = engine_with_tokenizer(chat_dir)
    service = make_service(llm_engine)
    rendered = llm_engine.tokenizer.apply_chat_template(HELLO)
    assert llm_engine.tokenizer.decode(rendered, False).endswith("<|im_start|>assistant\n")
    client = service.client()
    deltas = list(client.chat(HELLO, max_tokens=6, ignore_eos=True, request_id="c1"))
    direct = list(engine_with_tokenizer(chat_dir).stream(
        rendered, SamplingParams(max_tokens=6, ignore_eos=True)))[-1]
    assert [t for d in deltas for t in d.token_ids] == direct.token_ids
    assert "".join(d.text for d in deltas) == direct.text
    assert all(d.request_id == "c1" for d in deltas)
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage.prompt_tokens == len(rendered)
    assert deltas[-1].usage.completion_tokens == 6


def test_a_model_without_a_chat_template_is_failed_precondition(make_service, tiny_model_dir):
    service = make_service(engine_with_tokenizer(tiny_model_dir))
    err = rpc_error(lambda: list(service.client().chat(HELLO, max_tokens=2)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no chat template" in err.details()
    # ...and without any tokenizer at all (token-id-only models) the same.
    err = rpc_error(lambda: list(make_service().client().chat(HELLO, max_tokens=2)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("conversation,sampling,message", [
    ([], {}, "messages must be a non-empty list"),
    (HELLO, {"temperature": -1.0}, "temperature must be >= 0.0"),
    (HELLO, {"max_tokens": 500}, "exceeds max_model_len"),
])
def test_bad_chat_requests_are_invalid_argument(make_service, chat_dir, conversation,
                                                sampling, message):
    service = make_service(engine_with_tokenizer(chat_dir))
    err = rpc_error(lambda: list(service.client().chat(conversation, **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()
    assert not service.llm_engine.has_unfinished_requests()


def test_another_tenants_token_and_no_token_are_unauthenticated(make_service, chat_dir):
    service = make_service(engine_with_tokenizer(chat_dir), tenants={TOKEN: "team-a"})
    for token in ("token-team-b", None):
        err = rpc_error(lambda: list(service.client(token).chat(HELLO, max_tokens=2)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_generate_chat_sends_one_user_message(make_service, chat_dir, capsys):
    llm_engine = engine_with_tokenizer(chat_dir)
    service = make_service(llm_engine, engine=AsyncEngine(llm_engine))
    code = main(["generate", "--chat", "--target", service.target, "--token", TOKEN,
                 "--max-tokens", "5", "--temperature", "0", "Hello"])
    out = capsys.readouterr().out
    want = service.client().chat([{"role": "user", "content": "Hello"}], max_tokens=5,
                                 temperature=0.0)
    assert code == 0 and out == "".join(d.text for d in want) + "\n"


def test_the_demo_asks_a_chat_model_through_chat_and_others_hello(make_service, chat_dir,
                                                                   tiny_model_dir):
    import io
    from types import SimpleNamespace

    from colocate.serve_demo import send_demo_requests

    chat = make_service(engine_with_tokenizer(chat_dir))
    plain = make_service(engine_with_tokenizer(tiny_model_dir))
    tenant = SimpleNamespace(token=TOKEN)
    cfg = SimpleNamespace(services=lambda: [(None, SimpleNamespace(name=n, tenants=[tenant]))
                                            for n in ("a", "b")])
    endpoints = [SimpleNamespace(service="a", target=chat.target),
                 SimpleNamespace(service="b", target=plain.target)]
    out = io.StringIO()
    send_demo_requests(cfg, endpoints, out, max_tokens=4)
    a, b = out.getvalue().splitlines()[:2]
    assert a.startswith("  a: 'What is the capital of Japan?' -> ")
    assert b.startswith("  b: 'Hello' -> ")
