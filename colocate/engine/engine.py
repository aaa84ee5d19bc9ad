"""LLMEngine: step() = schedule -> execute -> sample -> update; add and abort.

The engine is single-threaded and synchronous; the serving layer drives it from
one loop thread. It knows nothing of gRPC or Ray. The model runner it drives is
anything with `execute(SchedulerOutput) -> {request_id: StepResult}` and
`release(request_id)`.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from colocate.engine.cache_sleep import CacheSleep
from colocate.engine.kv_cache_manager import KVCacheManager
from colocate.engine.output_processor import OutputProcessor
from colocate.engine.outputs import RequestOutput
from colocate.engine.request import FinishReason, Request
from colocate.engine.scheduler import (DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP, Scheduler,
                                       SchedulerOutput)
from colocate.engine.stats import EngineStatistics, StatisticsSnapshot
from colocate.sampling_params import SamplingParams


class StepFailedError(RuntimeError):
    """The model runner raised during a step. `request_ids` are the requests that
    step had scheduled: their blocks are allocated for KV values that were never
    (or only partly) written, so the caller must abort them; every other request
    is as it was before the step."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"model step failed for {len(request_ids)} request(s)")
        self.request_ids = request_ids


class PromptTooLongError(ValueError):
    """Prompt plus max_tokens exceed max_model_len or the whole KV cache; a
    ValueError, so callers that do not care are unaffected."""


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int               # including the null block
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool = True
    # Where this engine's blocks start in the KV tensors it writes: 1 alone; in an
    # engine group each member owns its own range of one shared cache.
    first_block_id: int = 1
    # Prefill tokens a step that holds a decode may take (scheduler.py); None: no cap.
    max_prefill_tokens_per_mixed_step: int | None = DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP


class LLMEngine:
    def __init__(self, runner, limits: EngineLimits, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = (), request_id_prefix: str = "req-") -> None:
        self.runner = runner
        self.limits = limits
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.request_id_prefix = request_id_prefix
        self.kv = KVCacheManager(limits.num_blocks, limits.block_size,
                                 limits.enable_prefix_caching, limits.first_block_id)
        self.scheduler = Scheduler(self.kv, limits.max_num_seqs, limits.max_num_batched_tokens,
                                   limits.max_model_len, limits.max_prefill_tokens_per_mixed_step)
        self.output_processor = OutputProcessor(tokenizer)
        self._ids = itertools.count()
        self.num_steps = 0
        self.stats = EngineStatistics()
        # Shared with the other members when this engine joins an engine group, which
        # names its pool there (`pool_name`).
        self.pool_name = request_id_prefix
        self.cache_sleep = CacheSleep()
        self.cache_sleep.join(self.pool_name, self.scheduler)

    # ---- requests ----------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer.json; "
                                 "pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming the field and the limit; changes nothing."""
        lim = self.limits
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < lim.vocab_size:
                raise ValueError(
                    f"prompt token id {t!r} is outside the vocabulary [0, {lim.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > lim.max_model_len:
            raise PromptTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds max_model_len ({lim.max_model_len})")
        capacity = (lim.num_blocks - 1) * lim.block_size
        if total > capacity:
            raise PromptTooLongError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{total} exceeds the whole KV cache (kv_cache_tokens={capacity})")

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        rid = (request_id if request_id is not None
               else f"{self.request_id_prefix}{next(self._ids)}")
        if rid in self.scheduler.requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        self.wake()
        request = Request(rid, prompt_ids, params, self.eos_token_ids)
        self.output_processor.add(request)
        self.scheduler.add_request(request)
        return rid

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks go back to the pool before this returns."""
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return None
        request.finish(FinishReason.ABORT)
        output = self.output_processor.make_output(request)
        self.scheduler.finish_request(request)
        self._release(request)
        return output

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _release(self, request: Request) -> None:
        """What is left of a request the scheduler has finished: statistics, text
        state, the runner's per-request state."""
        self.stats.on_finish(request, time.monotonic())
        self.output_processor.remove(request.request_id)
        self.runner.release(request.request_id)

    # ---- sleep and wake ------------------------------------------------------
    @property
    def sleeping(self) -> bool:
        return self.cache_sleep.is_asleep(self.pool_name)

    def can_sleep(self) -> bool:
        return self.cache_sleep.why_not(self.runner, self.pool_name) is None

    def sleep(self) -> None:
        """Give the KV pool's memory back; the next add_request takes it back, zeroed,
        first. Only when idle; a member of an engine group sleeps alone where the
        device can free its block range alone (colocate/engine/cache_sleep.py)."""
        self.cache_sleep.sleep(self.runner, [self.pool_name])

    def wake(self) -> None:
        """Take the KV pool back (zeroed) if asleep; the time it took is recorded
        here, by the engine whose request waited for it."""
        start = time.monotonic()
        if self.cache_sleep.wake(self.runner, self.pool_name):
            self.stats.wake.observe(time.monotonic() - start)

    # ---- the step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance every scheduled request by one step; return an output for each
        request that produced tokens or finished."""
        sched = self.scheduler.schedule()
        if sched.empty:
            return []
        try:
            results = self.runner.execute(sched)
        except Exception as exc:
            raise StepFailedError([s.request.request_id for s in sched.scheduled]) from exc
        return self.apply_step(sched, results)

    def apply_step(self, sched: SchedulerOutput, results) -> list[RequestOutput]:
        """The second half of a step whose batch someone else ran (an engine group
        runs its members' batches as one): results is request_id -> StepResult."""
        self.num_steps += 1
        outputs = []
        now = time.monotonic()           # one clock read per step, not per request
        for request in self.scheduler.update_from_output(sched, results):
            self.stats.on_token(request, now)
            if self.output_processor.on_token(request):
                self.scheduler.finish_request(request)               # a stop string ended it
            outputs.append(self.output_processor.make_output(request))
            if request.is_finished:
                self._release(request)
        return outputs

    def statistics(self) -> StatisticsSnapshot:
        """Counters, latency histograms and load, as of now. Safe from any thread
        (see colocate/engine/stats.py for why no lock is needed)."""
        st, kv = self.stats, self.kv
        running, waiting = self.scheduler.queue_lengths()
        return StatisticsSnapshot(
            num_running=running, num_waiting=waiting,
            kv_blocks_used=kv.num_used_blocks, kv_blocks_total=kv.num_usable_blocks,
            kv_blocks_lent=kv.num_lent_blocks, kv_blocks_borrowed=kv.num_borrowed_blocks,
            block_size=self.limits.block_size, prompt_tokens=st.prompt_tokens,
            generation_tokens=st.generation_tokens,
            preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits, finished=dict(st.finished),
            ttft=st.ttft.snapshot(), inter_token=st.inter_token.snapshot(),
            e2e=st.e2e.snapshot(), queue_time=st.queue_time.snapshot(),
            sleeping=self.sleeping, wake=st.wake.snapshot())

    # ---- conveniences --------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], params: SamplingParams) -> Iterator[RequestOutput]:
        """Drive the engine until this request finishes, yielding its outputs.
        Closing the iterator early aborts the request and frees its blocks."""
        rid = self.add_request(prompt, params)
        done = False
        try:
            while not done:
                for out in self.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.abort_request(rid)
