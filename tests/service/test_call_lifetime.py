"""A call that ends early (deadline passed, client cancelled, server stopped)
stops its request before the engine's next step and frees its KV blocks."""
from __future__ import annotations

import threading

import grpc
import pytest

from colocate.client import _generate_request
from tests.service.conftest import TOKEN
from tests.service.helpers import (GatedRunner, SlowRunner, make_llm_engine, rpc_error,
                                   steps_with, wait_for_thread_count, wait_until)

LONG = dict(max_tokens=400)
PROMPT = list(range(1, 40))        # 10 blocks of 4


@pytest.mark.parametrize("call", ["generate", "complete"])
def test_deadline_aborts_a_long_request_and_frees_its_blocks(make_service, call):
    service = make_service(make_llm_engine(SlowRunner(0.005)))
    client = service.client()
    pool = service.llm_engine.kv.pool
    run = {"generate": lambda: list(client.generate(PROMPT, timeout=0.3, **LONG)),
           "complete": lambda: client.complete(PROMPT, timeout=0.3, **LONG)}[call]
    err = rpc_error(run)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: pool.num_used_blocks == 0, what="blocks freed after the deadline")
    assert not service.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("end", ["deadline", "cancel"])
def test_ended_call_is_out_of_the_engine_within_one_step(make_service, end):
    """Hold the engine inside the request's first step, end the call, then let
    the step finish: the request must take part in no further step."""
    runner = GatedRunner()
    service = make_service(make_llm_engine(runner))
    client = service.client()
    call = client._stub.Generate(
        _generate_request(PROMPT, "held", LONG), metadata=client._metadata,
        timeout=0.3 if end == "deadline" else 30)
    assert runner.entered.wait(5)           # the step with our request is under way
    if end == "cancel":
        call.cancel()
    err = rpc_error(lambda: list(call))
    assert err.code() == {"deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
                          "cancel": grpc.StatusCode.CANCELLED}[end]
    # The server saw the end too (its callback queued the abort) before the step ends.
    wait_until(lambda: service.engine._to_abort, what="the abort to be queued")
    runner.gate.set()
    pool = service.llm_engine.kv.pool
    wait_until(lambda: pool.num_used_blocks == 0, what="blocks freed")
    assert steps_with(runner, "team-a/held") == 1


def test_cancel_mid_stream_frees_blocks_and_threads(make_service):
    baseline = threading.active_count()
    service = make_service(make_llm_engine(SlowRunner()))
    pool = service.llm_engine.kv.pool
    stream = service.client().generate(PROMPT, **LONG)
    for _ in range(3):
        assert not next(stream).finished
    assert pool.num_used_blocks >= 10
    stream.close()                        # cancels the call
    wait_until(lambda: pool.num_used_blocks == 0, what="blocks freed after cancel")
    wait_until(lambda: not service.llm_engine.has_unfinished_requests(), what="request aborted")
    service.stop()
    wait_for_thread_count(baseline)


def test_server_stop_with_a_stream_open_frees_everything(make_service):
    baseline = threading.active_count()
    service = make_service(make_llm_engine(SlowRunner()))
    stream = service.client(TOKEN).generate([7, 8, 9], **LONG)
    next(stream)
    service.server.stop(grace=0)
    wait_until(lambda: service.llm_engine.kv.pool.num_used_blocks == 0,
               what="blocks freed after server stop")
    service.stop()
    wait_for_thread_count(baseline)
