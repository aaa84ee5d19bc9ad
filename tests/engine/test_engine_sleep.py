"""LLMEngine.sleep / wake over the fake runner: the pool's contents are forgotten, the
runner's cache freed, and the next request wakes the engine and is served as before."""
from __future__ import annotations

import pytest

from colocate.sampling_params import SamplingParams
from tests.service.helpers import make_llm_engine

PARAMS = SamplingParams(max_tokens=6, temperature=0.0)
PROMPT = list(range(1, 12))          # 11 tokens: two full blocks of 4 get cached


def run(engine, prompt=PROMPT) -> list[int]:
    return [t for out in engine.stream(prompt, PARAMS) for t in out.new_token_ids]


def test_sleep_frees_the_cache_and_the_next_request_wakes_it():
    engine = make_llm_engine()
    before = run(engine)
    assert engine.kv.pool.cached                        # the prompt's blocks are cached
    engine.sleep()
    assert engine.sleeping and not engine.runner.kv_allocated
    assert not engine.kv.pool.cached                    # their values are gone
    engine.kv.pool.check_whole()
    snap = engine.statistics()
    assert snap.sleeping and snap.wake.count == 0
    assert run(engine) == before                        # add_request woke it first
    assert not engine.sleeping and engine.runner.kv_allocated
    snap = engine.statistics()
    assert not snap.sleeping and snap.wake.count == 1
    # Nothing was found in the prefix cache after the wake: all 11 tokens recomputed,
    # where an engine that stayed awake finds the two full blocks again.
    assert engine.kv.prefix_hits == 0
    awake = make_llm_engine()
    run(awake), run(awake)
    assert awake.kv.prefix_hits == 8


def test_sleep_with_a_request_in_flight_is_refused_and_changes_nothing():
    engine = make_llm_engine()
    engine.add_request(PROMPT, PARAMS, "r")
    engine.step()
    with pytest.raises(RuntimeError, match="cannot sleep: 1 running"):
        engine.sleep()
    assert not engine.sleeping and engine.runner.kv_allocated
    tokens = [t for _ in range(10) for out in engine.step() for t in out.new_token_ids]
    assert len(tokens) == PARAMS.max_tokens - 1


def test_sleep_and_wake_are_idempotent():
    engine = make_llm_engine()
    engine.wake()                                       # awake: nothing to do
    engine.sleep()
    engine.sleep()
    assert engine.sleeping
    engine.wake()
    engine.wake()
    assert not engine.sleeping and engine.statistics().wake.count == 1
