"""AsyncEngine: one LLMEngine driven by one background thread, fed from many.

LLMEngine is not thread-safe, so only the loop thread ever calls add_request,
abort_request or step. Other threads (gRPC handlers) talk to it through an
inbox guarded by one lock: submit() validates the request under that lock and
queues it; abort() queues the stream to stop. The loop drains the inbox before
every step, so an abort takes effect, and frees the request's blocks, before
the next step runs. Outputs go back through one queue per request.

The loop never spins: with no request in the engine and nothing in the inbox it
sleeps on the lock's condition variable until submit, abort or shutdown wakes it.

A step whose model run raises fails only the requests that step held (their
consumers get RequestFailedError, which carries no detail of the cause); the
others carry on. Only a run of failed steps in a row declares the engine dead,
since then the fault is in the engine, not in one batch.

drain() is the first half of a graceful stop: new requests are refused and the
health check fails at once, while the requests already in flight run to the end.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence

from colocate.engine.engine import LLMEngine, StepFailedError
from colocate.engine.outputs import RequestOutput
from colocate.sampling_params import SamplingParams
from colocate.serving.engine_protocol import EngineDeadError, EngineStats, QueueFullError

log = logging.getLogger(__name__)

# If the engine holds requests but schedules nothing (it should not happen: every
# admitted request fits the pool), wait this long before trying again rather
# than spinning on an empty step.
_STALL_WAIT_S = 0.005
# Failed steps in a row after which the engine is declared dead (and its service
# restarted by its supervisor): one bad batch is not a broken engine, three are.
MAX_CONSECUTIVE_STEP_FAILURES = 3


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
    call start() and shutdown()."""

    def __init__(self, engine: LLMEngine, max_queued_requests: int | None = None) -> None:
        if max_queued_requests is not None and max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._cond = threading.Condition()
        # Everything below is guarded by _cond.
        self._streams: dict[str, AsyncRequestStream] = {}    # live: submitted, not ended
        self._to_add: list[tuple[AsyncRequestStream, SamplingParams]] = []
        self._to_abort: list[AsyncRequestStream] = []
        self._stopping = False
        self._draining = False
        self._dead_reason: str | None = "engine not started"
        self._stats = self._snapshot()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._stopping:
                raise EngineDeadError("engine shut down; build a new one to serve again")
            if self._thread is not None:
                return
            self._dead_reason = None
            self._thread = threading.Thread(target=self._run, name="colocate-engine-loop",
                                            daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every request (consumers get a final "abort" output), free every
        block and join the loop thread. Idempotent."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            if self._dead_reason is None:
                self._dead_reason = "engine shut down"
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"engine loop did not stop within {timeout} s")
        else:
            self._abort_everything(error=None)    # never started: nothing else owns the engine

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
            while self._streams and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return not self._streams

    def check_health(self) -> None:
        with self._cond:
            reason = self._dead_reason
            if reason is None and self._draining:
                reason = "shutting down: not accepting new requests"
            if reason is None and self._thread is not None and not self._thread.is_alive():
                reason = "engine loop thread exited"
        if reason is not None:
            raise EngineDeadError(reason)

    def stats(self) -> EngineStats:
        with self._cond:
            return self._stats

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
            if self._dead_reason is not None:
                raise EngineDeadError(self._dead_reason)
            if self._draining:
                raise EngineDeadError("the service is shutting down; retry elsewhere")
            # tokenize and validate read only the tokenizer and the frozen limits,
            # never scheduler state, so they are safe beside a running step.
            prompt_ids = self.engine.tokenize(prompt)
            self.engine.validate(prompt_ids, params)
            rid = request_id if request_id is not None else f"async-{next(self._ids)}"
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            queued = self._stats.num_waiting + len(self._to_add)
            if self.max_queued_requests is not None and queued >= self.max_queued_requests:
                raise QueueFullError(f"{queued} requests are queued "
                                     f"(max_queued_requests={self.max_queued_requests})")
            stream = AsyncRequestStream(rid, prompt_ids, self)
            self._streams[rid] = stream
            self._to_add.append((stream, params))
            self._cond.notify()
        return stream

    # The protocol's name for submit (Ray Serve LLM calls it generate).
    generate = submit

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
                self._cond.notify()

    # ---- the loop thread -----------------------------------------------------
    def _run(self) -> None:
        error: BaseException | None = None
        wait: float | None = None          # None: sleep until notified
        failed_in_a_row = 0
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._to_add or self._to_abort
                               or wait is not None):
                        self._cond.wait()
                    if self._stopping:
                        break
                    if wait:
                        self._cond.wait(wait)
                    adds, self._to_add = self._to_add, []
                    aborts = [s for s in self._to_abort if self._streams.get(s.request_id) is s]
                    self._to_abort = []
                outputs = self._apply(adds, aborts)
                steps_before = self.engine.num_steps
                if self.engine.has_unfinished_requests():
                    try:
                        outputs += self.engine.step()
                        failed_in_a_row = 0
                    except StepFailedError as exc:
                        failed_in_a_row += 1
                        if failed_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise
                        log.error("engine step failed (%d in a row); failing its %d "
                                  "request(s)", failed_in_a_row, len(exc.request_ids),
                                  exc_info=exc.__cause__)
                        self._fail_requests(exc.request_ids)
                with self._cond:
                    self._deliver(outputs)
                    self._stats = self._snapshot()
                if not self.engine.has_unfinished_requests():
                    wait = None
                else:
                    wait = 0.0 if self.engine.num_steps > steps_before else _STALL_WAIT_S
        except Exception as exc:     # the engine is broken: fail every request
            log.exception("engine loop failed; aborting every request")
            error = exc
        finally:
            self._abort_everything(error)

    def _apply(self, adds, aborts) -> list[RequestOutput]:
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

    def _fail_requests(self, request_ids: list[str]) -> None:
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

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Under _cond: hand each output to its stream; forget ended streams."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
                self._cond.notify_all()          # drain() may be waiting for this

    def _abort_everything(self, error: BaseException | None) -> None:
        """The loop is over: abort what the engine holds (freeing every block)
        and end every stream, with a final abort output, or the error."""
        with self._cond:
            if error is not None:
                # The type only: this text reaches clients (UNAVAILABLE), and an
                # exception's message may hold addresses or data; the log has it all.
                self._dead_reason = f"engine loop failed: {type(error).__name__}"
            self._stopping = True
            streams = list(self._streams.values())
            self._streams.clear()
            self._cond.notify_all()              # drain() may be waiting for this
            self._to_add, self._to_abort = [], []
        dead = EngineDeadError(self._dead_reason) if error is not None else None
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
        return EngineStats(num_running=self.engine.scheduler.num_running,
                           num_waiting=self.engine.scheduler.num_waiting,
                           kv_blocks_used=kv.num_used_blocks,
                           kv_blocks_total=kv.num_usable_blocks)
