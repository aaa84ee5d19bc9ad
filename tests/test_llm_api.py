"""The offline LLM API: text prompts, seeds, stop strings, and bad input that is
refused with a ValueError naming the field while the engine stays as it was."""
from __future__ import annotations

import math

import pytest

from colocate import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_model_len=256, kv_cache_tokens=2048)


def test_text_and_token_prompts(llm):
    outs = llm.generate(["Hello world", [1, 15, 16]], SamplingParams(max_tokens=5, temperature=0))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("Hello world")
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids)
    assert all(o.finish_reason == "length" for o in outs)


def test_single_prompt_of_token_ids(llm):
    out, = llm.generate([1, 15043 % llm.config.vocab_size], SamplingParams(max_tokens=3))
    assert len(out.token_ids) == 3


def test_same_seed_same_tokens_alone_or_in_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate(["Once upon a time"], params)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=0.8, seed=s) for s in (1, 2)]
    batch = llm.generate(["Hello", "Once upon a time", "xyz"],
                         [others[0], params, SamplingParams(max_tokens=9, temperature=1.3)])
    assert batch[1].token_ids == alone
    assert llm.generate(["Once upon a time"], params)[0].token_ids == alone
    different = llm.generate(["Once upon a time"],
                             SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99))
    assert different[0].token_ids != alone


def test_stop_string_cuts_text(llm):
    free = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    out = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                 stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    kept = llm.generate(["Hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                  stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]


def test_min_tokens_holds_off_eos(llm):
    eos = llm.tokenizer.eos_token_ids[0]
    out = llm.generate([[1, 5]], SamplingParams(max_tokens=6, min_tokens=6, temperature=0,
                                                stop_token_ids=list(range(3, 200))))[0]
    assert len(out.token_ids) == 6 and eos not in out.token_ids


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt,params,match", [
    ("", SamplingParams(), "prompt must not be empty"),
    ([], SamplingParams(), "prompt must not be empty"),
    ([1, 10**9], SamplingParams(), "outside the vocabulary"),
    ([1, -3], SamplingParams(), "outside the vocabulary"),
    ([1] * 250, SamplingParams(max_tokens=10), "max_model_len \\(256\\)"),
])
def test_bad_prompts_leave_engine_unchanged(llm, prompt, params, match):
    before = llm.engine.kv.pool.num_free_blocks
    with pytest.raises(ValueError, match=match):
        llm.generate(["fine prompt", prompt], params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.pool.num_free_blocks == before
    # The engine still works afterwards (ignore_eos: a randomly sampled end-of-sequence
    # token would stop it at one; a CI run once drew it).
    again = llm.generate(["ok"], SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(again[0].token_ids) == 2


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float64"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"quantization": "int3"}, "quantization"),
    ({"kv_cache_tokens": 4}, "kv_cache_tokens"),
    ({"block_size": 0}, "block_size"),
])
def test_bad_engine_arguments(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_model_dir), **kwargs)


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_auto_dtype_is_the_checkpoints(tiny_model_dir, tmp_path, stored):
    """dtype="auto" (as in the README) takes config.json's torch_dtype, for the model
    and the engine's KV cache alike."""
    import json
    import shutil

    import torch

    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "torch_dtype": stored}))
    auto = LLM(str(path), dtype="auto", kv_cache_tokens=256)
    want = getattr(torch, stored)
    assert {p.dtype for p in auto.model.parameters()} == {want}
    assert auto.engine.runner.kv_caches[0].key.dtype == want
    explicit = LLM(str(path), dtype=stored, kv_cache_tokens=256)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    assert (auto.generate([[1, 5, 9]], params)[0].token_ids
            == explicit.generate([[1, 5, 9]], params)[0].token_ids)
