"""AsyncEngine: one service's front to an engine that a loop thread drives.

LLMEngine is not thread-safe, so only the loop thread (colocate/service/
engine_loop.py) ever calls add_request, abort_request or step. Other threads (gRPC
handlers) talk to it through this front's inbox, guarded by the loop's lock:
submit() validates the request under that lock and queues it; abort() queues the
stream to stop. Outputs go back through one queue per request.

A service alone owns its loop (AsyncEngine(engine) builds one). Services fused
into one engine group share one loop, each with its own front: its own queue
limit, streams, statistics, drain and health, over its own member engine.

A step whose model run raises fails only the requests that step held (their
consumers get RequestFailedError, which carries no detail of the cause); the
others carry on. drain() is the first half of a graceful stop: new requests are
refused and the health check fails at once, while the requests already in flight
run to the end.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence

from colocate.engine.engine import LLMEngine
from colocate.engine.outputs import RequestOutput
from colocate.model.chat_template import NoChatTemplateError
from colocate.sampling_params import SamplingParams
from colocate.service.engine_loop import MAX_CONSECUTIVE_STEP_FAILURES, EngineLoop, SingleEngine
from colocate.service.engine_protocol import EngineDeadError, EngineStats, QueueFullError

log = logging.getLogger(__name__)
__all__ = ["AsyncEngine", "AsyncRequestStream", "RequestFailedError",
           "MAX_CONSECUTIVE_STEP_FAILURES"]


class RequestFailedError(RuntimeError):
    """The engine failed while running this request; it was aborted. Deliberately
    not a subclass of the errors the gRPC layer maps to specific codes, so it
    becomes INTERNAL with a fixed message; the cause stays in the service log."""


class AsyncRequestStream:
    """The consumer's end of one request: iterate for RequestOutput deltas.

    Fed by the loop thread through a queue. An item may be an exception, raised
    to the consumer (the engine failed). Closing the stream before the final
    output aborts the request; it is safe from any thread and more than once.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], owner: "AsyncEngine"):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._owner = owner
        self._queue: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        self._done = threading.Event()     # the consumer saw the end (or closed)

    def __iter__(self) -> "AsyncRequestStream":
        return self

    def __next__(self) -> RequestOutput:
        if self._done.is_set():      # the final output was taken, or the consumer left
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done.set()
            raise item
        if item.finished:
            self._done.set()
        return item

    def close(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._owner._abort_stream(self)

    def __enter__(self) -> "AsyncRequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put(item)


class AsyncEngine:
    """Implements EngineProtocol over an LLMEngine. Use as a context manager, or
    call start() and shutdown(). With `loop`, the engine is a member of a group
    that loop steps (the group's owner starts and shuts down the loop)."""

    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None,
                 loop: EngineLoop | None = None, sleep_after_idle: float | None = None,
                 intra_op_threads: int | None = None) -> None:
        """sleep_after_idle: seconds idle after which the engine gives its KV pool
        back until the next request, intra_op_threads: torch's threads in the loop's
        thread (see engine_loop.py); both only with a loop of its own."""
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        if loop is not None and (sleep_after_idle, intra_op_threads) != (None, None):
            raise ValueError("sleep_after_idle and intra_op_threads are set on the loop a "
                             "group's fronts share")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._owns_loop = loop is None
        self._loop = (loop if loop is not None
                      else EngineLoop(SingleEngine(engine), sleep_after_idle,
                                      intra_op_threads))
        self._cond = self._loop.cond
        # Everything below is guarded by _cond.
        self._streams: dict[str, AsyncRequestStream] = {}    # live: submitted, not ended
        self._to_add: list[tuple[AsyncRequestStream, SamplingParams]] = []
        self._to_abort: list[AsyncRequestStream] = []
        self._draining = False
        self._closed: str | None = None      # a member front shut down on its own
        self._stats = self._snapshot()
        self._ids = itertools.count()
        self._loop.attach(self)

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        self._loop.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request (consumers get a final "abort" output), free every
        block; a front that owns its loop also joins the loop thread. Idempotent."""
        if self._owns_loop:
            self._loop.shutdown(timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closed = "service shut down"
            self._to_abort.extend(self._streams.values())
            self._cond.notify_all()
            while self._streams and self._loop.thread is not None and not self._loop.stopping:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise RuntimeError(f"requests not aborted within {timeout} s")
                self._cond.wait(left)

    def __enter__(self) -> "AsyncEngine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (and fail health checks) from now on; wait up to
        `timeout` seconds for the requests in flight to finish. True if they did.
        The engine keeps running: shutdown() still has to be called."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            while self._streams and not self._loop.stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._streams

    def _problem(self) -> str | None:
        """Under _cond: why this front cannot take a request, or None."""
        return self._loop.health_problem() or self._closed

    def check_health(self) -> None:
        with self._cond:
            reason = self._problem()
            if reason is None and self._draining:
                reason = "shutting down: not accepting new requests"
        if reason is not None:
            raise EngineDeadError(reason)

    def stats(self) -> EngineStats:
        with self._cond:
            stats = self._stats
        kv = self.engine.kv
        if kv.lending is not None and kv.lending.crosses_processes:
            # Neighbours in other processes borrow and give back while this loop may be
            # idle: the loan figures are read from the exchange now, not at the last step.
            stats = dataclasses.replace(stats, kv_blocks_used=kv.num_used_blocks,
                                        kv_blocks_lent=kv.num_lent_blocks,
                                        kv_blocks_borrowed=kv.num_borrowed_blocks)
        return stats

    # ---- requests ------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams,
               request_id: str | None = None) -> AsyncRequestStream:
        """Queue a request and return its stream. Bad input raises ValueError
        here, before anything is queued."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        with self._cond:
            reason = self._loop.dead_reason or self._closed
            if reason is not None:
                raise EngineDeadError(reason)
            if self._draining:
                raise EngineDeadError("the service is shutting down; retry elsewhere")
            # tokenize and validate read only the tokenizer and the frozen limits,
            # never scheduler state, so they are safe beside a running step.
            prompt_ids = self.engine.tokenize(prompt)
            self.engine.validate(prompt_ids, params)
            rid = (request_id if request_id is not None
                   else f"{self.engine.request_id_prefix}async-{next(self._ids)}")
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            queued = self._stats.num_waiting + len(self._to_add)
            if self.max_queued_requests is not None and queued >= self.max_queued_requests:
                raise QueueFullError(f"{queued} requests are queued "
                                     f"(max_queued_requests={self.max_queued_requests})")
            stream = AsyncRequestStream(rid, prompt_ids, self)
            self._streams[rid] = stream
            self._to_add.append((stream, params))
            self._cond.notify_all()
        return stream

    # The protocol's name for submit (Ray Serve LLM calls it generate).
    generate = submit

    # ---- chat: both doors render a conversation here ----------------------------
    def chat_prompt(self, messages) -> list[int]:
        """A conversation -> prompt token ids through the model's chat template.
        NoChatTemplateError when there is none; ValueError for bad messages."""
        if self.engine.tokenizer is None:
            raise NoChatTemplateError()
        return self.engine.tokenizer.apply_chat_template(messages)

    def submit_chat(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> AsyncRequestStream:
        """submit() a rendered conversation; the reply also stops at the template's
        end-of-turn token."""
        return self.submit(prompt_ids, self.engine.tokenizer.chat_params(params), request_id)

    # Tokenizing reads only the tokenizer (whose Rust core is safe to share
    # between threads) and the frozen limits, so it needs neither the lock nor
    # the loop, and works on a stopped engine too.
    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {type(text).__name__}")
        if not text:
            raise ValueError("text must not be empty")
        return self.engine.tokenize(text)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        vocab = self.engine.limits.vocab_size
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"token_ids[{i}] = {t!r} is outside the vocabulary [0, {vocab})")
        if self.engine.tokenizer is None:
            raise ValueError("the model has no tokenizer.json; nothing to decode with")
        return self.engine.tokenizer.decode(list(token_ids), skip_special_tokens)

    def abort(self, request_id: str) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
        if stream is not None:
            self._abort_stream(stream)

    def _abort_stream(self, stream: AsyncRequestStream) -> None:
        # Queued by identity, not id: a late abort must not hit a new request
        # that reused the id after this one ended.
        with self._cond:
            if self._streams.get(stream.request_id) is stream:
                self._to_abort.append(stream)
                self._cond.notify_all()

    # ---- called by the loop ----------------------------------------------------
    def has_inbox(self) -> bool:
        """Under _cond."""
        return bool(self._to_add or self._to_abort)

    def take_inbox(self):
        """Under _cond: the adds and the aborts still meant for live streams."""
        adds, self._to_add = self._to_add, []
        aborts = [s for s in self._to_abort if self._streams.get(s.request_id) is s]
        self._to_abort = []
        return adds, aborts

    def apply_inbox(self, adds, aborts) -> list[RequestOutput]:
        """Loop thread only: move the inbox into the engine."""
        outputs = []
        for stream, params in adds:
            try:
                self.engine.add_request(stream.prompt_token_ids, params, stream.request_id)
            except ValueError as exc:        # validated in submit; kept for safety
                with self._cond:
                    self._streams.pop(stream.request_id, None)
                stream._put(exc)
        for stream in aborts:
            final = self.engine.abort_request(stream.request_id)
            if final is not None:
                outputs.append(final)
        return outputs

    def fail_requests(self, request_ids: list[str]) -> None:
        """Loop thread only: abort requests a failed step held (freeing their
        blocks) and end their streams with RequestFailedError."""
        for rid in request_ids:
            self.engine.abort_request(rid)
            with self._cond:
                stream = self._streams.pop(rid, None)
                self._cond.notify_all()          # drain() may be waiting for this
            if stream is not None:
                stream._put(RequestFailedError("the engine failed while running this "
                                               "request; it was aborted"))

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """Under _cond: hand each output to its stream; forget ended streams."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
                self._cond.notify_all()          # drain() may be waiting for this
        self._stats = self._snapshot()

    def end_everything(self, dead: EngineDeadError | None) -> None:
        """The loop is over: abort what the engine holds (freeing every block) and
        end every stream, with a final abort output, or `dead`."""
        with self._cond:
            streams = list(self._streams.values())
            self._streams.clear()
            self._cond.notify_all()              # drain() may be waiting for this
            self._to_add, self._to_abort = [], []
        for stream in streams:
            try:
                final = self.engine.abort_request(stream.request_id)
            except Exception:
                log.exception("abort of %s failed during shutdown", stream.request_id)
                final = None
            if final is None:      # never reached the engine
                final = RequestOutput(stream.request_id, stream.prompt_token_ids, [], "",
                                      finished=True, finish_reason="abort")
            stream._put(dead if dead is not None else final)
        with self._cond:
            self._stats = self._snapshot()

    def _snapshot(self) -> EngineStats:
        kv = self.engine.kv
        running, waiting = self.engine.scheduler.queue_lengths()
        return EngineStats(num_running=running, num_waiting=waiting,
                           kv_blocks_used=kv.num_used_blocks,
                           kv_blocks_total=kv.num_usable_blocks,
                           sleeping=self.engine.sleeping,
                           kv_blocks_lent=kv.num_lent_blocks,
                           kv_blocks_borrowed=kv.num_borrowed_blocks)
