"""The whole path with a real (tiny) checkpoint: text in, tokens and text out."""
from __future__ import annotations

import pytest

from colocate.sampling_params import SamplingParams
from colocate.serving.async_engine import AsyncEngine
from tests.serving.conftest import TOKEN


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
