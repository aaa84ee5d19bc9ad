"""AsyncEngine: one loop thread over an LLMEngine, fed from many threads."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from colocate.sampling_params import SamplingParams
from colocate.service.async_engine import (MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine,
                                            RequestFailedError)
from colocate.service.engine_protocol import EngineDeadError, EngineProtocol, QueueFullError
from tests.engine.fake_runner import FakeRunner
from tests.service.helpers import (BLOCK_SIZE, VOCAB, FailingRunner, GatedRunner, SlowRunner,
                                   expected_tokens, make_llm_engine, prompts_of_lengths, run_direct,
                                   wait_for_thread_count, wait_until)


@pytest.fixture
def baseline_threads():
    return threading.active_count()


def collect(stream):
    outs = list(stream)
    assert outs and outs[-1].finished
    assert all(not o.finished for o in outs[:-1])
    return outs


def test_is_an_engine_protocol():
    engine = AsyncEngine(make_llm_engine())
    assert isinstance(engine, AsyncEngine)
    proto_methods = {"start", "generate", "tokenize", "detokenize", "abort", "check_health",
                     "stats", "shutdown"}
    assert proto_methods <= {m for m in dir(EngineProtocol) if not m.startswith("_")}
    assert all(callable(getattr(engine, m)) for m in proto_methods)
    engine.shutdown()


def test_stream_matches_direct_engine(baseline_threads):
    params = SamplingParams(max_tokens=12)
    prompt = [5, 6, 7, 8, 9]
    with AsyncEngine(make_llm_engine()) as engine:
        outs = collect(engine.submit(prompt, params))
    assert [t for o in outs for t in o.new_token_ids] == run_direct(prompt, params)
    assert outs[-1].token_ids == expected_tokens(prompt, 12)
    assert outs[-1].finish_reason == "length"
    wait_for_thread_count(baseline_threads)


class ThreadCountRunner(FakeRunner):
    """Records torch's intra-op threads in the thread that steps it."""

    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE, VOCAB)
        self.seen: set[int] = set()

    def execute(self, sched):
        self.seen.add(torch.get_num_threads())
        return super().execute(sched)


def test_the_loop_thread_computes_on_its_own_intra_op_threads():
    """The service runtimes keep the building thread at one torch thread and give the
    loop's thread the service's (engine_loop.py says why); the caller's own count is
    left as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = ThreadCountRunner()
        with AsyncEngine(make_llm_engine(runner), intra_op_threads=3) as engine:
            collect(engine.submit([5, 6, 7], SamplingParams(max_tokens=4)))
        assert runner.seen == {3}
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_concurrent_submits_match_sequential_run():
    prompts = prompts_of_lengths([1, 3, 7, 12, 20, 33, 2, 9, 15, 4, 26, 11])
    params = [SamplingParams(max_tokens=5 + i % 7) for i in range(len(prompts))]
    sequential = [run_direct(p, sp) for p, sp in zip(prompts, params)]
    results: dict[int, list[int]] = {}
    errors = []

    def client(indices):
        try:
            for i in indices:
                outs = collect(engine.submit(prompts[i], params[i]))
                results[i] = [t for o in outs for t in o.new_token_ids]
        except Exception as exc:       # surfaced below, with the thread's error
            errors.append(exc)

    # max_num_seqs < number of clients, so requests also wait and interleave.
    with AsyncEngine(make_llm_engine(max_num_seqs=3, max_num_batched_tokens=16)) as engine:
        threads = [threading.Thread(target=client, args=(range(k, len(prompts), 4),))
                   for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        pool = engine.engine.kv.pool
        assert pool.num_used_blocks == 0
    assert not errors
    assert [results[i] for i in range(len(prompts))] == sequential


def test_bad_input_raises_in_submit_and_queues_nothing():
    with AsyncEngine(make_llm_engine(max_model_len=64)) as engine:
        with pytest.raises(ValueError, match="max_model_len"):
            engine.submit(list(range(60)), SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([1, 5000], SamplingParams())
        with pytest.raises(ValueError, match="prompt must not be empty"):
            engine.submit([], SamplingParams())
        with pytest.raises(ValueError, match="tokenizer"):
            engine.submit("text, but no tokenizer", SamplingParams())
        with pytest.raises(ValueError, match="sampling_params"):
            engine.submit([1], {"max_tokens": 3})
        assert engine._streams == {} and engine._to_add == []
        # The engine still serves after refusing.
        assert collect(engine.submit([1, 2], SamplingParams(max_tokens=2)))[-1].finished


def test_duplicate_request_id_is_refused_while_live_and_free_after():
    runner = GatedRunner()
    with AsyncEngine(make_llm_engine(runner)) as engine:
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=2), request_id="x")
        with pytest.raises(ValueError, match="request_id 'x' is already in use"):
            engine.submit([4], SamplingParams(), request_id="x")
        runner.gate.set()
        collect(stream)
        collect(engine.submit([4], SamplingParams(max_tokens=1), request_id="x"))


def test_closing_a_stream_mid_way_frees_its_blocks(baseline_threads):
    with AsyncEngine(make_llm_engine(SlowRunner())) as engine:
        pool = engine.engine.kv.pool
        stream = engine.submit(list(range(1, 30)), SamplingParams(max_tokens=400))
        for _ in range(3):
            assert not next(stream).finished
        assert pool.num_used_blocks > 0
        stream.close()
        wait_until(lambda: pool.num_used_blocks == 0, what="blocks freed after close")
        wait_until(lambda: not engine.engine.has_unfinished_requests(), what="request gone")
        assert list(stream) == []            # a closed stream ends
    wait_for_thread_count(baseline_threads)


def test_abort_by_id_ends_the_stream_with_abort():
    with AsyncEngine(make_llm_engine(SlowRunner())) as engine:
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=400), request_id="r")
        next(stream)
        engine.abort("r")
        engine.abort("no-such-request")      # ignored
        assert collect(stream)[-1].finish_reason == "abort"
        assert engine.engine.kv.pool.num_used_blocks == 0


def test_shutdown_aborts_in_flight_requests_and_frees_every_block(baseline_threads):
    engine = AsyncEngine(make_llm_engine(SlowRunner()))
    engine.start()
    streams = [engine.submit([i + 1] * (i + 3), SamplingParams(max_tokens=400)) for i in range(5)]
    next(streams[0])
    engine.shutdown()
    for s in streams:
        assert collect(s)[-1].finish_reason == "abort"
    assert engine.engine.kv.pool.num_used_blocks == 0
    assert not engine.engine.has_unfinished_requests()
    with pytest.raises(EngineDeadError, match="shut down"):
        engine.submit([1], SamplingParams())
    with pytest.raises(EngineDeadError):
        engine.check_health()
    engine.shutdown()                        # idempotent
    with pytest.raises(EngineDeadError, match="build a new one"):
        engine.start()
    wait_for_thread_count(baseline_threads)


def test_idle_loop_sleeps_instead_of_spinning():
    with AsyncEngine(make_llm_engine()) as engine:
        collect(engine.submit([1, 2], SamplingParams(max_tokens=3)))
        calls = []
        real = engine.engine.has_unfinished_requests
        engine.engine.has_unfinished_requests = lambda: calls.append(1) or real()
        time.sleep(0.2)
        assert calls == []                   # the loop did not wake while idle
        assert engine.engine.num_steps == 3


def test_queue_full_is_refused():
    runner = GatedRunner()
    with AsyncEngine(make_llm_engine(runner), max_queued_requests=1) as engine:
        first = engine.submit([1, 2], SamplingParams(max_tokens=2))
        assert runner.entered.wait(5)        # the loop is inside a step; the inbox waits
        second = engine.submit([3, 4], SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError, match="max_queued_requests=1"):
            engine.submit([5, 6], SamplingParams(max_tokens=2))
        runner.gate.set()
        collect(first), collect(second)


def test_engine_failure_fails_streams_and_health_and_frees_blocks(baseline_threads):
    engine = AsyncEngine(make_llm_engine(FailingRunner()))
    engine.start()
    # A failed step fails only its requests; a run of them kills the engine.
    for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=4))
        with pytest.raises(RequestFailedError):
            list(stream)
        engine.check_health()
    stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(EngineDeadError, match="engine loop failed: StepFailedError"):
        list(stream)
    with pytest.raises(EngineDeadError, match="engine loop failed"):
        engine.check_health()
    assert engine.engine.kv.pool.num_used_blocks == 0
    engine.shutdown()
    wait_for_thread_count(baseline_threads)


def test_stats_and_health_of_a_running_engine():
    with AsyncEngine(make_llm_engine(SlowRunner())) as engine:
        engine.check_health()
        stream = engine.submit([1] * 9, SamplingParams(max_tokens=400))
        next(stream)
        # Stats are published after each step; the request holds 3 blocks of 4 by now.
        wait_until(lambda: engine.stats().num_running == 1
                   and engine.stats().kv_blocks_used >= 3, what="stats of the running request")
        assert engine.stats().kv_blocks_total == 127
        stream.close()
        wait_until(lambda: engine.stats().kv_blocks_used == 0, what="stats after abort")
    with pytest.raises(EngineDeadError, match="not started"):
        AsyncEngine(make_llm_engine()).check_health()
