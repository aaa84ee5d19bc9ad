"""The OpenAI-compatible HTTP door over SmolLM2-135M-Instruct, driven with the
official `openai` package: the models list, chat plain and streamed, completions,
logprobs, and greedy replies equal through HTTP, gRPC Chat and the offline LLM.chat.
Errors, limits and disconnects (over the fake runner) are in test_http_errors.py."""
from __future__ import annotations

import openai
import pytest

from colocate.model.published import published_path
from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import AsyncEngine
from tests.service.served import TOKEN, ServiceStarter

NAMES = ["smollm2-135m", "smollm2"]         # served_model_name first, then the model key
QUESTIONS = ["What is the capital of France?"]
MAX_TOKENS = 12


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def smollm2():
    """One SmolLM2 engine: the offline references first, then served over both doors."""
    from colocate.llm import LLM

    # No prefix caching: every run takes the same compute path as the reference.
    llm = LLM(model=str(published_path("smollm2-135m-instruct")), kv_cache_tokens=2048,
              max_model_len=512, enable_prefix_caching=False)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    references = {q: out.text for q, out in zip(
        QUESTIONS, llm.chat([ask(q) for q in QUESTIONS], greedy))}
    references["completion"] = llm.generate(["The capital of France is"], greedy)[0].text
    starter = ServiceStarter("smollm2")
    service = starter.start(llm.engine, engine=AsyncEngine(llm.engine),
                            http=dict(names=NAMES))
    yield service, references
    starter.stop_all()


@pytest.fixture(scope="module")
def sdk(smollm2):
    return smollm2[0].openai()


def test_models_lists_the_served_name(sdk):
    assert [m.id for m in sdk.models.list().data] == ["smollm2-135m"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_chat_equals_grpc_chat_and_llm_chat(smollm2, sdk, question):
    service, references = smollm2
    reply = sdk.chat.completions.create(model="smollm2", messages=ask(question),
                                        max_tokens=MAX_TOKENS, temperature=0)
    grpc_text = "".join(d.text for d in service.client().chat(
        ask(question), max_tokens=MAX_TOKENS, temperature=0.0))
    assert reply.choices[0].message.content == grpc_text == references[question]
    assert reply.choices[0].message.role == "assistant"
    assert reply.model == "smollm2" and reply.object == "chat.completion"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_plain_and_ends_with_usage(smollm2, sdk):
    _, references = smollm2
    chunks = list(sdk.chat.completions.create(
        model="smollm2-135m", messages=ask(QUESTIONS[0]), max_completion_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    *deltas, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == references[QUESTIONS[0]]
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in deltas)
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_streamed_chat_without_include_usage_has_no_usage_chunk(sdk):
    chunks = list(sdk.chat.completions.create(
        model="smollm2", messages=ask("Hi"), max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_completions_plain_and_streamed(smollm2, sdk):
    _, references = smollm2
    plain = sdk.completions.create(model="smollm2", prompt="The capital of France is",
                                   max_tokens=MAX_TOKENS, temperature=0)
    streamed = list(sdk.completions.create(model="smollm2", prompt="The capital of France is",
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert plain.choices[0].text == references["completion"]
    assert "".join(c.choices[0].text for c in streamed[:-1]) == references["completion"]
    assert plain.usage.completion_tokens == streamed[-1].usage.completion_tokens == MAX_TOKENS
    assert plain.choices[0].finish_reason == "length"


def test_chat_logprobs(sdk):
    reply = sdk.chat.completions.create(model="smollm2", messages=ask("Hi"), max_tokens=3,
                                        temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the sampled token is the most likely one
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_seeded_sampling_is_reproducible_and_engine_extras_are_taken(sdk):
    kwargs = dict(model="smollm2", messages=ask("Tell me a story."), max_tokens=6,
                  temperature=1.0, top_p=0.9, seed=11, presence_penalty=0.5,
                  frequency_penalty=0.5, stop=["\n\n"],
                  extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                              "min_tokens": 3, "ignore_eos": True})
    first = sdk.chat.completions.create(**kwargs).choices[0].message.content
    assert first == sdk.chat.completions.create(**kwargs).choices[0].message.content


def test_a_wrong_key_and_a_bad_field(smollm2):
    service, _ = smollm2
    with pytest.raises(openai.AuthenticationError):
        service.openai("not-a-tenant").models.list()
    with pytest.raises(openai.BadRequestError) as err:
        service.openai(TOKEN).chat.completions.create(model="smollm2", messages=ask("Hi"),
                                                      temperature=-1)
    assert err.value.body["param"] == "temperature" and "temperature" in err.value.message
    with pytest.raises(openai.NotFoundError) as err:
        service.openai(TOKEN).chat.completions.create(model="gpt-4", messages=ask("Hi"))
    assert err.value.body["param"] == "model"
    assert not service.llm_engine.has_unfinished_requests()
