"""The whole path with a real (tiny) checkpoint: text in, tokens and text out."""
from __future__ import annotations

import pytest

from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import AsyncEngine
from tests.service.conftest import TOKEN


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    from colocate.llm import LLM

    # No prefix caching: the served run must take the same compute path as the direct one.
    return LLM(model=str(tiny_model_dir), kv_cache_tokens=512, max_model_len=256,
               enable_prefix_caching=False)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.8, seed=7)])
def test_served_tokens_equal_direct_generation(tiny_llm, make_service, sampling):
    prompt = "The quick brown fox"
    direct = tiny_llm.generate([prompt], SamplingParams(max_tokens=12, **sampling))[0]
    service = make_service(tiny_llm.engine, engine=AsyncEngine(tiny_llm.engine))
    client = service.client(TOKEN)
    deltas = list(client.generate(prompt, max_tokens=12, **sampling))
    assert [t for d in deltas for t in d.token_ids] == direct.token_ids
    assert "".join(d.text for d in deltas) == direct.text
    assert client.generate_text(prompt, max_tokens=12, **sampling) == direct.text
    assert deltas[-1].usage.prompt_tokens == len(direct.prompt_token_ids)


def test_prompt_logprobs_come_once(tiny_llm, make_service):
    service = make_service(tiny_llm.engine, engine=AsyncEngine(tiny_llm.engine))
    deltas = list(service.client(TOKEN).generate([1, 50, 60, 70], max_tokens=3,
                                                 temperature=0.0, prompt_logprobs=0))
    first = deltas[0].prompt_logprobs
    assert len(first) == 4 and first[0] is None and all(v <= 0.0 for v in first[1:])
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_tokenize_round_trips_and_matches_generate(tiny_llm, make_service):
    service = make_service(tiny_llm.engine, engine=AsyncEngine(tiny_llm.engine))
    client = service.client(TOKEN)
    text = "The quick brown fox"
    ids = client.tokenize(text)
    assert ids == tiny_llm.engine.tokenizer.encode(text)
    assert client.detokenize(ids) == tiny_llm.engine.tokenizer.decode(ids)
    # The prompt Generate feeds the model is exactly what Tokenize returns.
    result = client.complete(text, max_tokens=4, temperature=0.0)
    assert result.usage.prompt_tokens == len(ids)
    assert result.token_ids == client.complete(ids, max_tokens=4, temperature=0.0).token_ids


def test_cli_generate_streams_the_text(tiny_llm, make_service, capsys, monkeypatch):
    from colocate.cli import main

    service = make_service(tiny_llm.engine, engine=AsyncEngine(tiny_llm.engine))
    expected = service.client(TOKEN).generate_text("Hello", max_tokens=6, temperature=0.0)
    monkeypatch.setenv("COLOCATE_TOKEN", TOKEN)      # the token need not be on the command line
    code = main(["generate", "--target", service.server.target, "--max-tokens", "6",
                 "--temperature", "0", "Hello"])
    out = capsys.readouterr()
    assert (code, out.out, out.err) == (0, expected + "\n", "")
