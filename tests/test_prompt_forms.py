"""LLM.generate takes vLLM's prompt forms: text, token ids, {"prompt": ...},
{"prompt_token_ids": [...]}, one or a list; anything else is a TypeError naming the type."""
from __future__ import annotations

import pytest

from colocate import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_model_len=256, kv_cache_tokens=2048)


def test_every_form_gives_the_same_tokens(llm):
    ids = llm.tokenizer.encode("Hello there")
    expect = llm.generate(ids, GREEDY)[0].token_ids
    for form in ("Hello there", ids, {"prompt": "Hello there"}, {"prompt_token_ids": ids}):
        assert llm.generate(form, GREEDY)[0].token_ids == expect, form
    batch = llm.generate(["Hello there", ids, {"prompt": "Hello there"},
                          {"prompt_token_ids": ids}], GREEDY)
    assert [o.token_ids for o in batch] == [expect] * 4
    assert batch[3].prompt_token_ids == ids


@pytest.mark.parametrize("prompt, match", [
    (42, "prompts must be .* got int"),
    (b"bytes", "prompts must be .* got bytes"),
    ([3.5], r"prompts\[0\] must be .* got float"),
    (["ok", None], r"prompts\[1\] must be .* got NoneType"),
    ({"text": "hi"}, "dict without 'prompt' or 'prompt_token_ids'"),
    ({"prompt": 7}, r"\['prompt'\] must be a str, got int"),
    ({"prompt_token_ids": "abc"}, r"\['prompt_token_ids'\] must be a non-empty list of ints, "
                                  "got str"),
])
def test_other_types_are_a_type_error(llm, prompt, match):
    before = llm.engine.kv.pool.num_free_blocks
    with pytest.raises(TypeError, match=match):
        llm.generate(prompt, GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free_blocks == before


def test_token_ids_in_a_dict_are_checked_against_the_vocabulary(llm):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 10**9]}, GREEDY)


def test_chat_without_a_template_says_so(llm):
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
