"""Engines over the fake runner, and small waits, for the serving tests."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.sampling_params import SamplingParams
from tests.engine.fake_runner import FakeRunner, next_token

VOCAB = 1000
BLOCK_SIZE = 4


class SlowRunner(FakeRunner):
    """Takes `delay` seconds per step, so a stream is still running when a test
    cancels it."""

    def __init__(self, delay: float = 0.002) -> None:
        super().__init__(BLOCK_SIZE, VOCAB)
        self.delay = delay

    def execute(self, sched):
        time.sleep(self.delay)
        return super().execute(sched)


class GatedRunner(FakeRunner):
    """Blocks inside every step until the test opens the gate, so the loop thread
    can be held at a known point."""

    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE, VOCAB)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def execute(self, sched):
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        return super().execute(sched)


class FailingRunner(FakeRunner):
    def __init__(self) -> None:
        super().__init__(BLOCK_SIZE, VOCAB)

    def execute(self, sched):
        raise RuntimeError("simulated device failure")


def make_llm_engine(runner=None, num_blocks=128, max_num_seqs=8, max_num_batched_tokens=64,
                    max_model_len=512) -> LLMEngine:
    limits = EngineLimits(vocab_size=VOCAB, max_model_len=max_model_len, block_size=BLOCK_SIZE,
                          num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens)
    return LLMEngine(runner or FakeRunner(BLOCK_SIZE, VOCAB), limits)


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """What the fake runner generates for `prompt`, whatever the batching."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens, VOCAB))
    return tokens[len(prompt):]


def run_direct(prompt, params: SamplingParams) -> list[int]:
    """The reference: a fresh LLMEngine driven in this thread."""
    return list(make_llm_engine().stream(prompt, params))[-1].token_ids


def rpc_error(fn) -> grpc.RpcError:
    """The error a gRPC call raises (the test fails if it raises none)."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def steps_with(runner: FakeRunner, request_id: str) -> int:
    """How many of the runner's steps included the request."""
    return sum(any(rid == request_id for rid, _ in step) for step in runner.steps)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def wait_for_thread_count(baseline: int, timeout: float = 5.0) -> None:
    # Threads are joined on stop, but give the table a moment before failing.
    try:
        wait_until(lambda: threading.active_count() <= baseline, timeout, "threads to exit")
    except AssertionError:
        names = [t.name for t in threading.enumerate()]
        raise AssertionError(f"{len(names)} threads left, baseline {baseline}: {names}") from None


def prompts_of_lengths(lengths: list[int], seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]
