"""sleep_after_idle in a service's loop and doors: an idle engine gives its pool back,
the next request wakes it with the same answer, a request is never caught by a sleep,
and GetModelInfo / GetStats say `sleeping`. Fake runner, so only the loop is timed."""
from __future__ import annotations

import time

import grpc
import pytest

from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import AsyncEngine
from colocate.service.engine_loop import EngineLoop, FusedEngines, SingleEngine
from tests.engine.test_engine_group import make_group, member_range
from tests.service.helpers import (GatedRunner, SlowRunner, expected_tokens, make_llm_engine,
                                   wait_until)

IDLE_S = 0.2
PARAMS = SamplingParams(max_tokens=5, temperature=0.0)
PROMPT = [5, 6, 7, 8, 9]


def tokens(engine: AsyncEngine, prompt=PROMPT) -> list[int]:
    return list(engine.submit(prompt, PARAMS))[-1].token_ids


def asleep(engine: AsyncEngine) -> bool:
    return engine.stats().sleeping


def test_an_idle_service_sleeps_and_the_next_request_wakes_it():
    llm = make_llm_engine()
    with AsyncEngine(llm, sleep_after_idle=IDLE_S) as engine:
        assert tokens(engine) == expected_tokens(PROMPT, 5)
        wait_until(lambda: asleep(engine), 10, "the idle engine to sleep")
        assert llm.sleeping and not llm.runner.kv_allocated
        engine.check_health()                               # asleep is healthy
        assert tokens(engine) == expected_tokens(PROMPT, 5)
        assert llm.statistics().wake.count == 1
        wait_until(lambda: asleep(engine), 10, "the engine to sleep again")
    llm.kv.pool.check_whole()


def test_a_service_never_sleeps_while_a_request_runs():
    """One step held for many idle periods: the loop has a request, so no sleep, and
    the request ends with every token."""
    runner = GatedRunner()
    llm = make_llm_engine(runner)
    with AsyncEngine(llm, sleep_after_idle=0.01) as engine:
        stream = engine.submit(PROMPT, PARAMS)
        assert runner.entered.wait(10)
        # A submit queued behind the held step is work too: it must not let a sleep in.
        second = engine.submit([1, 2, 3], PARAMS)
        for _ in range(20):
            runner.entered.clear()
            time.sleep(0.05)                                # five idle periods in a step
            assert not asleep(engine) and runner.kv_allocated
            runner.gate.set()
            runner.gate.clear()
            if not runner.entered.wait(1):
                break
        runner.gate.set()
        assert list(stream)[-1].token_ids == expected_tokens(PROMPT, 5)
        assert list(second)[-1].token_ids == expected_tokens([1, 2, 3], 5)
        assert llm.statistics().wake.count == 0
        wait_until(lambda: asleep(engine), 10, "the engine to sleep once idle")


def test_without_the_setting_a_service_never_sleeps():
    llm = make_llm_engine()
    with AsyncEngine(llm) as engine:
        tokens(engine)
        assert engine._loop.sleep_after_idle == {llm: None} and not asleep(engine)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sleep_after_idle must be > 0"):
        EngineLoop(SingleEngine(make_llm_engine()), 0)
    group, _ = make_group({"a": 8, "b": 8})
    loop = EngineLoop(FusedEngines(group))
    with pytest.raises(ValueError, match="sleep_after_idle and intra_op_threads are set on"):
        AsyncEngine(group.members["a"], loop=loop, sleep_after_idle=1.0)
    with pytest.raises(ValueError, match="sleep_after_idle and intra_op_threads are set on"):
        AsyncEngine(group.members["a"], loop=loop, intra_op_threads=2)
    with pytest.raises(ValueError, match="intra_op_threads must be >= 1, got 0"):
        EngineLoop(FusedEngines(group), intra_op_threads=0)


def test_each_fused_member_sleeps_after_its_own_idle_time_while_the_others_step():
    """b (IDLE_S) sleeps alone while a streams; c (never) stays awake; b's next request
    wakes only b; and b, a lender, sleeps only once none of its blocks is lent."""
    runner = SlowRunner(0.01)                        # a's long requests outlast b's idle time
    group, _ = make_group({"a": 64, "b": 64, "c": 8}, budget=512, runner=runner,
                          lenders=["b"])
    a, b, c = (group.members[m] for m in "abc")
    loop = EngineLoop(FusedEngines(group), {a: 30.0, b: IDLE_S, c: None})
    fronts = {m: AsyncEngine(e, loop=loop) for m, e in group.members.items()}
    loop.start()
    try:
        # Two prompts of 150 tokens, prefilled in the first step, take 76 blocks: a
        # borrows 12 of lending b's at once, and more as its 90 tokens each grow.
        long = [[1 + i] + list(range(100, 249)) for i in range(2)]
        streams = [fronts["a"].submit(p, SamplingParams(max_tokens=90)) for p in long]
        wait_until(lambda: fronts["a"].stats().kv_blocks_borrowed > 0, 10, "a to borrow")
        time.sleep(2 * IDLE_S)                              # b idle past its time ...
        assert fronts["a"].stats().num_running == 2         # ... while its blocks are lent
        assert not asleep(fronts["b"]) and runner.kv_allocated and not runner.dropped
        assert [list(st)[-1].token_ids for st in streams] == [expected_tokens(p, 90)
                                                              for p in long]
        wait_until(lambda: asleep(fronts["b"]), 10, "b to sleep once nothing is lent")
        assert runner.dropped == member_range(group, "b") and not group.sleeping
        stream = fronts["a"].submit(PROMPT, SamplingParams(max_tokens=50))
        assert list(stream)[-1].token_ids == expected_tokens(PROMPT, 50)   # beside b asleep
        assert b.kv.num_lent_blocks == 0 and a.statistics().kv_blocks_borrowed == 0
        assert tokens(fronts["b"]) == expected_tokens(PROMPT, 5)           # wakes b alone
        assert [e.statistics().wake.count for e in (a, b, c)] == [0, 1, 0]
        assert not asleep(fronts["a"]) and not asleep(fronts["c"])
        wait_until(lambda: asleep(fronts["b"]), 10, "b to sleep again")
    finally:
        loop.shutdown()
    for engine in group.members.values():
        engine.kv.pool.check_whole()


def test_where_the_cache_frees_only_whole_the_members_sleep_together():
    runner = SlowRunner(0.01)
    runner.can_drop_kv_blocks = False                       # as a CUDA cache
    group, _ = make_group({"a": 128, "b": 8}, runner=runner)
    loop = EngineLoop(FusedEngines(group), IDLE_S)
    fronts = {m: AsyncEngine(e, loop=loop) for m, e in group.members.items()}
    loop.start()
    try:
        stream = fronts["a"].submit(PROMPT, SamplingParams(max_tokens=500))
        time.sleep(2 * IDLE_S)                              # b is due ...
        assert fronts["a"].stats().num_running == 1         # ... but a is busy
        assert not asleep(fronts["b"]) and runner.kv_allocated
        stream.close()                                      # a's request aborted: a idles
        wait_until(lambda: group.sleeping, 10, "the idle group to sleep")
        assert not runner.kv_allocated
        assert tokens(fronts["b"]) == expected_tokens(PROMPT, 5)   # b's request wakes all
        assert not asleep(fronts["a"]) and group.members["b"].statistics().wake.count == 1
    finally:
        loop.shutdown()


def test_model_info_and_stats_say_sleeping(make_service):
    """A service idle from its start sleeps too; the doors report it and stay open."""
    service = make_service(sleep_after_idle=IDLE_S)
    client = service.client()
    wait_until(lambda: client.stats().sleeping, 10, "GetStats to say sleeping")
    assert client.model_info().sleeping and client.health() == "SERVING"
    assert [t for d in client.generate(PROMPT, max_tokens=5, temperature=0.0)
            for t in d.token_ids] == expected_tokens(PROMPT, 5)
    assert service.llm_engine.statistics().wake.count == 1
    wait_until(lambda: client.model_info().sleeping, 10, "GetModelInfo to say sleeping again")
    with pytest.raises(grpc.RpcError):                      # still a closed door without a token
        service.client(token=None).model_info()
