"""Services fused into one engine group behind one loop thread, one front each:
their own streams, queue limits, drain and shutdown; one step for all of them."""
from __future__ import annotations

import threading

import pytest

from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import (MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine,
                                            RequestFailedError)
from colocate.service.engine_loop import EngineLoop, FusedEngines
from colocate.service.engine_protocol import EngineDeadError, QueueFullError
from tests.engine.test_engine_group import make_group
from tests.service.helpers import (BLOCK_SIZE, VOCAB, GatedRunner, expected_tokens,
                                   prompts_of_lengths, wait_for_thread_count)
from tests.engine.fake_runner import FakeRunner

MEMBERS = {"a": 40, "b": 40, "c": 40}


def fused(runner=None, queue_limits=None):
    group, runner = make_group(MEMBERS, runner=runner)
    loop = EngineLoop(FusedEngines(group))
    fronts = {m: AsyncEngine(e, (queue_limits or {}).get(m), loop=loop)
              for m, e in group.members.items()}
    return loop, fronts, runner


def test_three_fronts_stream_at_once_and_share_steps():
    baseline = threading.active_count()
    runner = GatedRunner()                   # holds the first step until every client is in
    loop, fronts, _ = fused(runner=runner)
    loop.start()
    warm = fronts["c"].submit([9, 9, 9], SamplingParams(max_tokens=2))
    assert runner.entered.wait(5)
    prompts = {m: prompts_of_lengths([3, 11, 25], seed=i) for i, m in enumerate(MEMBERS)}
    results, errors = {}, []

    def client(member):
        try:
            streams = [fronts[member].submit(p, SamplingParams(max_tokens=10))
                       for p in prompts[member]]
            results[member] = [list(s)[-1].token_ids for s in streams]
        except Exception as exc:          # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(m,)) for m in MEMBERS]
    for t in threads:
        t.start()
    def queued():
        with loop.cond:
            return sum(len(f._to_add) for f in fronts.values())

    while queued() < 9 and not errors:
        threading.Event().wait(0.01)         # all nine requests queued behind step 1
    runner.gate.set()
    for t in threads:
        t.join(30)
    assert list(warm)[-1].token_ids == expected_tokens([9, 9, 9], 2)
    assert not errors
    assert results == {m: [expected_tokens(p, 10) for p in ps] for m, ps in prompts.items()}
    mixed = [{rid.split("-")[0] for rid, _ in step} for step in runner.steps]
    assert any(len(members) > 1 for members in mixed)       # one forward, several services
    loop.shutdown()
    wait_for_thread_count(baseline)
    for front in fronts.values():
        front.engine.kv.pool.check_whole()


def test_each_front_keeps_its_own_queue_limit():
    runner = GatedRunner()
    loop, fronts, _ = fused(runner=runner, queue_limits={"a": 1, "b": 1})
    loop.start()
    first = fronts["a"].submit([1, 2], SamplingParams(max_tokens=2))
    assert runner.entered.wait(5)            # the loop is inside a step; inboxes wait
    queued = fronts["a"].submit([3, 4], SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError, match="max_queued_requests=1"):
        fronts["a"].submit([5, 6], SamplingParams(max_tokens=2))
    other = fronts["b"].submit([7, 8], SamplingParams(max_tokens=2))   # b's queue is its own
    runner.gate.set()
    assert [list(s)[-1].finish_reason for s in (first, queued, other)] == ["length"] * 3
    loop.shutdown()


class HeldAfterFirstStep(FakeRunner):
    """Steps once, then holds every step until `may_go_on()` is true, so a stream is
    still decoding when the test acts, however fast the machine."""

    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE, VOCAB)
        self.may_go_on = lambda: True
        self.steps_run = 0

    def execute(self, sched):
        if self.steps_run:
            for _ in range(10_000):
                if self.may_go_on():
                    break
                threading.Event().wait(0.001)
        self.steps_run += 1
        return super().execute(sched)


def _shut_down(front) -> bool:
    try:
        front.check_health()
    except EngineDeadError:
        return True
    return False


def test_shutting_one_front_down_leaves_the_others_serving():
    runner = HeldAfterFirstStep()
    loop, fronts, _ = fused(runner=runner)
    runner.may_go_on = lambda: _shut_down(fronts["a"])   # a's stream outlives step 1
    loop.start()
    long_a = fronts["a"].submit([1, 2, 3], SamplingParams(max_tokens=150))
    next(long_a)
    fronts["a"].shutdown()
    assert list(long_a)[-1].finish_reason == "abort"
    with pytest.raises(EngineDeadError, match="service shut down"):
        fronts["a"].check_health()
    fronts["b"].check_health()
    out = list(fronts["b"].submit([4, 5], SamplingParams(max_tokens=6)))[-1]
    assert out.token_ids == expected_tokens([4, 5], 6)
    assert fronts["a"].engine.kv.num_used_blocks == 0
    loop.shutdown()


class FailEvery(FakeRunner):
    """Fails the steps numbered in `failing`; with `gate`, the first step waits for it."""

    def __init__(self, failing: set[int], gate: threading.Event | None = None):
        super().__init__(BLOCK_SIZE, VOCAB)
        self.failing, self.calls, self.gate = failing, 0, gate
        self.entered = threading.Event()

    def execute(self, sched):
        self.calls += 1
        if self.calls == 1 and self.gate is not None:
            self.entered.set()
            self.gate.wait(10)
        if self.calls in self.failing:
            raise RuntimeError("simulated device failure")
        return super().execute(sched)


def test_a_failed_step_fails_its_requests_in_every_member_and_the_loop_goes_on():
    gate = threading.Event()
    runner = FailEvery({2}, gate)
    loop, fronts, _ = fused(runner=runner)
    loop.start()
    c = fronts["c"].submit([9, 9], SamplingParams(max_tokens=3))
    assert runner.entered.wait(5)          # step 1 (c's prefill) is held open
    a = fronts["a"].submit([1, 2], SamplingParams(max_tokens=3))
    b = fronts["b"].submit([3, 4], SamplingParams(max_tokens=3))
    gate.set()                             # step 2 holds a, b and c's decode: it fails
    for stream in (a, b, c):
        with pytest.raises(RequestFailedError):
            list(stream)
    out = list(fronts["c"].submit([5, 6], SamplingParams(max_tokens=3)))[-1]
    assert out.token_ids == expected_tokens([5, 6], 3)
    assert all(f.engine.kv.num_used_blocks == 0 for f in fronts.values())
    loop.shutdown()


def test_a_dead_loop_fails_every_front():
    loop, fronts, _ = fused(runner=FailEvery(set(range(1, 100))))
    loop.start()
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
        with pytest.raises(RequestFailedError):
            list(fronts["a"].submit([1, 2], SamplingParams(max_tokens=3)))
    with pytest.raises(EngineDeadError, match="engine loop failed: GroupStepFailedError"):
        list(fronts["b"].submit([1, 2], SamplingParams(max_tokens=3)))
    for front in fronts.values():
        with pytest.raises(EngineDeadError, match="engine loop failed"):
            front.check_health()
    loop.shutdown()


def test_a_front_needs_an_engine_of_its_loop():
    loop, fronts, _ = fused()
    other, _ = make_group({"x": 4})
    with pytest.raises(ValueError, match="not one this loop steps"):
        AsyncEngine(other.members["x"], loop=loop)
    with pytest.raises(ValueError, match="already has a front"):
        AsyncEngine(fronts["a"].engine, loop=loop)
    loop.shutdown()
