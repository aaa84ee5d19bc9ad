"""Engine and scheduler behaviour over the fake runner: batching, chunked
prefill, preemption, prefix caching, abort, bad input."""
from __future__ import annotations

import random

import pytest

from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner, next_token

VOCAB = 1000


def make_engine(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                max_model_len=512, prefix=True, prefill_cap=256):
    limits = EngineLimits(vocab_size=VOCAB, max_model_len=max_model_len, block_size=block_size,
                          num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=prefix,
                          max_prefill_tokens_per_mixed_step=prefill_cap)
    runner = FakeRunner(block_size, VOCAB)
    return LLMEngine(runner, limits, tokenizer=None, eos_token_ids=()), runner


def expected_tokens(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens, VOCAB))
    return tokens[len(prompt):]


def run_all(engine, prompts, max_tokens):
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    final = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return [final[i] for i in ids]


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def test_batch_generates_expected_tokens():
    engine, runner = make_engine()
    prompts = prompts_of([1, 5, 17, 30])
    outs = run_all(engine, prompts, 10)
    for p, o in zip(prompts, outs):
        assert o.token_ids == expected_tokens(p, 10)
        assert o.finish_reason == "length"
    # All four prefills fit the budget, so they ran together in the first step.
    assert len(runner.steps[0]) == 4


def test_chunked_prefill_respects_token_budget():
    engine, runner = make_engine(max_num_batched_tokens=8)
    prompts = prompts_of([30, 3])
    outs = run_all(engine, prompts, 5)
    for p, o in zip(prompts, outs):
        assert o.token_ids == expected_tokens(p, 5)
    assert all(sum(n for _, n in step) <= 8 for step in runner.steps)
    # The first prompt needed several chunks; the step that finished it mixed in the other.
    assert runner.steps[0] == [("req-0", 8)]


def test_a_step_with_decodes_takes_at_most_the_prefill_cap():
    """One engine: a prompt arriving while another request decodes is computed 6
    tokens a step beside it (the budget has room for 64); the tokens are unchanged."""
    engine, runner = make_engine(num_blocks=128, prefill_cap=6)
    first, second = prompts_of([5, 40], seed=2)
    r0 = engine.add_request(first, SamplingParams(max_tokens=20))
    engine.step()
    r1 = engine.add_request(second, SamplingParams(max_tokens=4))
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert final[r0].token_ids == expected_tokens(first, 20)
    assert final[r1].token_ids == expected_tokens(second, 4)
    steps = [dict(step) for step in runner.steps]
    assert steps[0] == {r0: 5}
    assert [s[r1] for s in steps[1:8]] == [6] * 6 + [4]      # 40 = 6 x 6 + 4
    assert all(s[r0] == 1 for s in steps[1:8])
    uncapped, runner2 = make_engine(num_blocks=128, prefill_cap=None)
    uncapped.add_request(first, SamplingParams(max_tokens=20))
    uncapped.step()
    uncapped.add_request(second, SamplingParams(max_tokens=4))
    uncapped.step()
    assert dict(runner2.steps[1]) == {"req-0": 1, "req-1": 40}


def test_preemption_recomputes_and_gives_same_tokens():
    # 9 usable blocks of 4 tokens: three requests growing to 20 tokens cannot coexist.
    engine, runner = make_engine(num_blocks=10, block_size=4)
    prompts = prompts_of([8, 8, 8], seed=3)
    outs = run_all(engine, prompts, 12)
    assert engine.scheduler.num_preemptions > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == expected_tokens(p, 12)


def test_newest_running_request_is_preempted_first():
    engine, _ = make_engine(num_blocks=7, block_size=4)
    for p in prompts_of([8, 8, 8], seed=4):
        engine.add_request(p, SamplingParams(max_tokens=12))
    preempted = []
    while engine.has_unfinished_requests():
        sched_preempted_before = engine.scheduler.num_preemptions
        engine.step()
        if engine.scheduler.num_preemptions > sched_preempted_before:
            preempted.append(engine.scheduler.waiting[0].request_id)
    assert preempted and preempted[0] == "req-2"


def test_prefix_cache_hits_share_blocks_and_keep_tokens():
    engine, _ = make_engine(block_size=4)
    shared = prompts_of([16], seed=5)[0]
    first = run_all(engine, [shared + [1, 2]], 4)[0]
    second = run_all(engine, [shared + [3, 4, 5]], 4)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 16
    assert second.token_ids == expected_tokens(shared + [3, 4, 5], 4)
    assert engine.kv.prefix_hits >= 16


def test_full_prompt_hit_still_computes_last_token():
    engine, runner = make_engine(block_size=4)
    prompt = prompts_of([16], seed=6)[0]
    run_all(engine, [prompt], 2)
    out = run_all(engine, [prompt], 2)[0]
    assert out.num_cached_tokens == 12        # the last block is recomputed
    assert out.token_ids == expected_tokens(prompt, 2)


def test_prefix_caching_off_gives_no_hits():
    engine, _ = make_engine(prefix=False)
    prompt = prompts_of([16], seed=7)[0]
    run_all(engine, [prompt], 2)
    assert run_all(engine, [prompt], 2)[0].num_cached_tokens == 0


def test_abort_frees_blocks_at_once():
    engine, runner = make_engine()
    rid = engine.add_request(prompts_of([20])[0], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.kv.pool.num_used_blocks > 0
    out = engine.abort_request(rid)
    assert out.finished and out.finish_reason == "abort"
    assert engine.kv.pool.num_used_blocks == 0
    assert rid in runner.released
    assert not engine.has_unfinished_requests()
    assert engine.abort_request(rid) is None


def test_stream_yields_tokens_and_aborts_when_closed():
    engine, _ = make_engine()
    prompt = prompts_of([5])[0]
    stream = engine.stream(prompt, SamplingParams(max_tokens=20))
    got = [next(stream).new_token_ids for _ in range(3)]
    assert sum(got, []) == expected_tokens(prompt, 3)
    stream.close()
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_used_blocks == 0


def test_stop_token_ids_and_min_tokens():
    engine, _ = make_engine()
    prompt = prompts_of([6], seed=8)[0]
    expect = expected_tokens(prompt, 10)
    stop = expect[3]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=10, stop_token_ids=[stop]))
    outs = [o for _ in range(20) for o in engine.step() if o.finished]
    assert outs[0].request_id == rid
    assert outs[0].token_ids == expect[:expect.index(stop) + 1]
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == stop


@pytest.mark.parametrize("field,prompt,params,match", [
    ("empty", [], SamplingParams(), "prompt must not be empty"),
    ("vocab", [1, VOCAB], SamplingParams(), "outside the vocabulary"),
    ("negative", [-1], SamplingParams(), "outside the vocabulary"),
    ("too long", [1] * 500, SamplingParams(max_tokens=20), "max_model_len"),
    ("kv", [1] * 200, SamplingParams(max_tokens=100), "kv_cache_tokens"),
])
def test_bad_input_raises_and_leaves_engine_unchanged(field, prompt, params, match):
    engine, _ = make_engine(num_blocks=64, block_size=4, max_model_len=512)
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_used_blocks == 0
