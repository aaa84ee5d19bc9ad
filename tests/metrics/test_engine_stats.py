"""The statistics the engine fills: bucket edges, bounded memory, and the counts a
real engine run produces."""
from __future__ import annotations

import types

import pytest

from colocate.engine.engine import PromptTooLongError
from colocate.engine.stats import EngineStatistics, Histogram
from colocate.sampling_params import SamplingParams


def test_a_value_on_a_bound_lands_in_that_bucket():
    h = Histogram((0.1, 1.0))
    for v in (0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.counts == (1, 2, 1)
    assert snap.cumulative() == [(0.1, 1), (1.0, 3), (float("inf"), 4)]
    assert snap.count == 4 and snap.sum == pytest.approx(8.6)


def test_a_histogram_does_not_grow():
    h = Histogram((0.1, 1.0))
    for i in range(10_000):
        h.observe(i * 1e-4)
    assert len(h.counts) == 3 and h.snapshot().count == 10_000


def test_bounds_must_ascend():
    with pytest.raises(ValueError, match="ascending"):
        Histogram((1.0, 0.5))


def test_prompt_counted_once_and_gaps_timed():
    stats = EngineStatistics()
    req = types.SimpleNamespace(arrival_time=10.0, first_scheduled_time=10.5,
                                first_token_time=None, last_token_time=None,
                                num_prompt_tokens=7, finish_reason="length")
    for now in (11.0, 11.25, 11.5):
        stats.on_token(req, now)
    stats.on_finish(req, 12.0)
    assert (stats.prompt_tokens, stats.generation_tokens) == (7, 3)
    assert stats.ttft.snapshot().sum == pytest.approx(1.0)
    assert stats.queue_time.snapshot().sum == pytest.approx(0.5)
    assert stats.inter_token.snapshot().count == 2
    assert stats.inter_token.snapshot().sum == pytest.approx(0.5)
    assert stats.e2e.snapshot().sum == pytest.approx(2.0)
    assert stats.finished == {"length": 1}


def test_a_real_engine_fills_the_statistics(tiny_model_dir):
    from colocate import LLM

    llm = LLM(model=str(tiny_model_dir), kv_cache_tokens=512, max_model_len=256)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 5, 6, 7]]
    llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    snap = llm.engine.statistics()
    assert snap.finished == {"length": 3}
    assert snap.prompt_tokens == 11 and snap.generation_tokens == 15
    assert snap.ttft.count == snap.queue_time.count == snap.e2e.count == 3
    assert snap.inter_token.count == 3 * 4
    assert snap.num_running == snap.num_waiting == snap.kv_blocks_used == 0
    assert snap.kv_capacity_tokens == 512
    assert snap.prefix_cache_queries == 11      # each admitted prompt looked up once


def test_too_long_is_its_own_error(tiny_model_dir):
    from colocate import LLM

    llm = LLM(model=str(tiny_model_dir), kv_cache_tokens=512, max_model_len=64)
    with pytest.raises(PromptTooLongError, match="max_model_len"):
        llm.engine.add_request([1] * 60, SamplingParams(max_tokens=10))
