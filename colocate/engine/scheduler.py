"""Scheduler: continuous batching over a token budget.

Each step it picks, within `max_num_batched_tokens`, how many new tokens every
request computes. It reasons in tokens, not phases: a decode is a request one
token behind, a prefill chunk is a request many tokens behind, and both share a
step. Running requests go first; when blocks run out the newest running request
is preempted (its blocks freed, to be recomputed later); waiting requests are
admitted only with what budget and blocks are left.

Mixed steps. A step that holds a decode (a running request one token behind) takes
at most `max_prefill_tokens_per_mixed_step` prefill tokens (prompt chunks, new or
resumed), so a long prompt is computed a few hundred tokens a step beside the
decodes instead of all at once, and their next token waits for one chunk only (as
vLLM's long-prefill threshold). A step with no decode is not capped. Chunks end
where they end: the tokens sampled are the same, only the step they land in moves.

After the step the scheduler owns what changed (update_from_output): computed
tokens, newly filled blocks into the prefix cache, the sampled token and its
log-probabilities, and stopping on a stop token id or on length, which frees the
request's blocks at once. Only stop strings are decided elsewhere, by the output
processor, because they are text.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from colocate.engine.kv_cache_manager import KVCacheManager
from colocate.engine.request import FinishReason, Request, RequestStatus

# Measured on SmolLM2-135M, 2 CPU cores (docs/benchmarks.md, "Fused batching").
DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP = 256


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int          # tokens computed this step, from request.num_computed_tokens
    block_ids: list[int]         # every block the request holds, in order

    @property
    def samples(self) -> bool:
        """True when this step reaches the request's last token, so its logits
        give the next token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 max_prefill_tokens_per_mixed_step: int | None = None) -> None:
        """max_prefill_tokens_per_mixed_step: None, no cap."""
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_per_mixed_step = max_prefill_tokens_per_mixed_step
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Preempted between steps because a lender took its blocks back: reported in
        # the next step's output (colocate/engine/kv_lending.py).
        self.reclaimed: list[Request] = []

    # ---- bookkeeping -------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queue_lengths(self) -> tuple[int, int]:
        """(running, waiting): the two numbers every statistic of the queue starts from."""
        return len(self.running), len(self.waiting)

    def finish_request(self, request: Request) -> None:
        """Drop a finished (or aborted) request and give its blocks back at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self.requests.pop(request.request_id, None)
        if self.kv.lending is not None and not self.has_unfinished():
            self.kv.lending.idle(self.kv.member)     # an isolated lender offers its blocks

    # ---- the step ----------------------------------------------------------
    def pending_split(self) -> tuple[int, int]:
        """(decode tokens, prefill tokens) one step could use at most: a token for each
        running request one behind; the backlog of the running requests further behind
        plus the prompts of the waiting requests that max_num_seqs would admit. An
        upper bound (prefix hits may need fewer); uncapped."""
        behind = [r.num_tokens - r.num_computed_tokens for r in self.running]
        room = max(0, self.max_num_seqs - len(self.running))
        waiting = sum(r.num_tokens for r in list(self.waiting)[:room])
        return behind.count(1), sum(n for n in behind if n > 1) + waiting

    def has_decode(self) -> bool:
        """Whether this step would hold a decode: a running request one token behind."""
        return any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)

    def pending_tokens(self, prefill_cap: int | None = None) -> int:
        """What one step could use at most (pending_split), with at most `prefill_cap`
        prefill tokens, capped at the token budget. Engine groups split a shared
        budget by it."""
        decode, prefill = self.pending_split()
        if prefill_cap is not None:
            prefill = min(prefill, prefill_cap)
        return min(decode + prefill, self.max_num_batched_tokens)

    def schedule(self, budget: int | None = None,
                 prefill_budget: int | None = None) -> SchedulerOutput:
        """This step's work within `budget` tokens (at most max_num_batched_tokens), of
        which at most `prefill_budget` are prefill. prefill_budget None: this
        scheduler's own cap if this step holds a decode, else none (an engine group
        passes it, as the decodes that matter may be another member's)."""
        if self.kv.lending is not None:
            self.kv.lending.serve_demands(self.kv.member)    # into self.reclaimed
        out = SchedulerOutput(preempted=self.reclaimed)
        self.reclaimed = []
        num_reclaimed = len(out.preempted)
        budget = (self.max_num_batched_tokens if budget is None
                  else min(budget, self.max_num_batched_tokens))
        if prefill_budget is None:
            cap = self.max_prefill_tokens_per_mixed_step
            prefill_budget = cap if cap is not None and self.has_decode() else budget

        # 1. Running requests keep their place; each asks for what it is behind
        # (a prefill chunk, within what prefill budget is left).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            behind = request.num_tokens - request.num_computed_tokens
            num_new = min(behind, budget, prefill_budget if behind > 1 else behind)
            if num_new == 0:
                i += 1              # a prefill with no prefill budget left: next step
                continue
            scheduled = self._grow_or_preempt(request, num_new, out)
            if not scheduled:
                break               # it preempted itself (the newest), or waits for loans
            out.scheduled.append(ScheduledRequest(
                request, num_new, self.kv.get_block_ids(request.request_id)))
            budget -= num_new
            if behind > 1:
                prefill_budget -= num_new
            i += 1

        # 2. Admit waiting requests, oldest (or most recently preempted) first.
        # Not in a step that had to preempt: the blocks are not there. (A reclaim
        # before the step took a lender's blocks, not this pool's own.)
        while (self.waiting and min(budget, prefill_budget) > 0
               and len(out.preempted) == num_reclaimed
               and len(self.running) < self.max_num_seqs):
            request = self.waiting[0]
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget, prefill_budget)
            if self.kv.allocate_slots(request, num_new, hit_blocks) is None:
                break
            self.waiting.popleft()
            self.kv.record_prefix_lookup(request, num_hit)
            request.num_computed_tokens = num_hit
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_hit
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(
                request, num_new, self.kv.get_block_ids(request.request_id)))
            budget -= num_new
            prefill_budget -= num_new
        return out

    def _grow_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Find blocks for num_new more tokens of a running request, preempting
        the newest running requests until they fit. False if the request had to
        preempt itself, or waits this step for blocks its pool lent (shared_lending.py)."""
        while self.kv.allocate_slots(request, num_new) is None:
            if self.kv.awaiting_loans:
                return False        # its lent blocks come back at the borrowers' next step
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    # ---- lending (colocate/engine/kv_lending.py) ---------------------------------
    def youngest_holding(self, owns) -> Request | None:
        """The youngest running request holding a block for which owns() is true."""
        holders = [r for r in self.running
                   if any(owns(b) for b in self.kv.req_to_blocks.get(r.request_id, ()))]
        return max(holders, key=lambda r: r.arrival_time, default=None)

    def preempt_for_owner(self, request: Request) -> None:
        """Preempt now, from another member's scheduling: the owner of blocks this
        request borrowed needs them. Lenders schedule first in a group step, so the
        request is not in this scheduler's output of the step."""
        self.running.remove(request)
        self._preempt(request)
        self.reclaimed.append(request)

    # ---- after the step ------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, results) -> list[Request]:
        """Apply a step's results (request_id -> StepResult) to the requests it ran.
        Returns the requests that sampled a token, in schedule order; any of them
        that stopped on a stop token id or on length is finished and freed."""
        sampled = []
        for s in out.scheduled:
            request = s.request
            result = results[request.request_id]
            if result.prompt_logprobs is not None:
                # After a preemption the prompt is recomputed: keep the first values.
                have = len(request.prompt_logprobs)
                first = request.num_computed_tokens + 1
                request.prompt_logprobs.extend(result.prompt_logprobs[max(0, have - first):])
            request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(request)
            if result.sample is None:
                continue
            sample = result.sample
            request.append_output_token(sample.token_id)
            if request.sampling_params.logprobs is not None:
                request.logprobs.append(sample.top_logprobs or {sample.token_id: sample.logprob})
            if self._stops(request, sample.token_id):
                self.finish_request(request)
            sampled.append(request)
        return sampled

    def _stops(self, request: Request, token_id: int) -> bool:
        """Finish the request if this token ends it: a stop id (once min_tokens are
        out), max_tokens, or max_model_len."""
        params = request.sampling_params
        n_out = request.num_output_tokens
        if n_out >= params.min_tokens and token_id in request.stop_token_ids:
            request.finish(FinishReason.STOP, stop_reason=token_id)
        elif n_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
            request.finish(FinishReason.LENGTH)
        return request.is_finished

    def _preempt(self, request: Request) -> None:
        # Recompute rather than swap: free the blocks, go back to the queue's front.
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
