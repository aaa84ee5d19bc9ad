"""EngineGroup: the services of one model on one device, stepped as one batch.

Each member is a whole LLMEngine of its own: its scheduler, queue, max_num_seqs,
preemption among its own requests, prefix cache, statistics and its own range of
blocks in the one KV cache the shared runner holds (EngineLimits.first_block_id),
so a member's budget holds by construction and no block, and so no prompt, is ever
shared across services. What the group adds is the step: every member schedules
within its share of one token budget, the union runs as ONE forward and one
sampler call over one copy of the weights, and each member applies its own results.

Fairness. When several members have work, the step's budget is split max-min fair
by weight (water-filling): a member that wants less than its share gets what it
wants, the rest is divided again among the others, so each backlogged member gets
at least min(its demand, budget * weight / total weight) every step, and a flood on
one member cannot take another's share. Tokens left by rounding go to the members
that have been served least per unit of weight so far, which keeps long-run shares
exact, in the spirit of VTC (Sheng et al., OSDI'24).

Lending. Members named in `lenders` lend their free blocks to the others and take
them back within one step (colocate/engine/kv_lending.py). Lenders schedule first in
every step, so a reclaim (which preempts borrowers' requests) never touches work a
borrower has already scheduled in that step.

Time. Tokens are not a step's cost (a decode row on a CPU costs about what the
weights' read does), so the group also keeps each member's engine time and a member
that leads the least served by more than `time_slice_s` sits out steps until the
others catch up (colocate/engine/time_shares.py): a light service beside a
neighbour's flood gets at least half the engine's time, not just its tokens.

Mixed steps. When any member has a decode in the step, the step's prefill tokens,
all members together, are capped at `max_prefill_tokens_per_mixed_step`, that cap
split among the members with prompts to compute by the same fair rule: one
service's long prompt runs in chunks beside the others' decodes, so their next
token waits for one chunk, not for the whole prompt (scheduler.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from colocate.engine.cache_sleep import CacheSleep
from colocate.engine.engine import LLMEngine
from colocate.engine.kv_lending import KVLending
from colocate.sampling_params import SamplingParams
from colocate.engine.outputs import RequestOutput
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP, SchedulerOutput
from colocate.engine.time_shares import DEFAULT_TIME_SLICE_S, TimeShares


class GroupStepFailedError(RuntimeError):
    """The shared runner raised during a group step: every request it had scheduled,
    by member, must be aborted; the members' other requests are as they were."""

    def __init__(self, request_ids: Mapping[str, list[str]]) -> None:
        total = sum(len(v) for v in request_ids.values())
        super().__init__(f"group step failed for {total} request(s)")
        self.request_ids = dict(request_ids)


def fair_shares(demands: Mapping[str, int], weights: Mapping[str, float], budget: int,
                served: Mapping[str, float] | None = None) -> dict[str, int]:
    """Split `budget` tokens max-min fair by weight among members with demand.
    `served` (tokens so far / weight) orders who gets the tokens rounding leaves."""
    shares = dict.fromkeys(demands, 0)
    want = {m: d for m, d in demands.items() if d > 0}
    left = budget
    while want and left > 0:
        total = sum(weights[m] for m in want)
        quota = {m: left * weights[m] / total for m in want}
        satisfied = [m for m in want if want[m] <= quota[m]]
        if satisfied:                      # they take what they want; split the rest again
            for m in satisfied:
                shares[m] += want.pop(m)
            left = budget - sum(shares.values())
            continue
        for m in want:                     # everyone wants more than its quota
            shares[m] += int(quota[m])
        left = budget - sum(shares.values())
        order = sorted(want, key=lambda m: ((served or {}).get(m, 0.0), m))
        for m in order[:left]:
            shares[m] += 1
        break
    return shares


@dataclass
class GroupStep:
    """One member's part of a group step."""
    member: str
    sched: SchedulerOutput


class EngineGroup:
    def __init__(self, runner, members: Mapping[str, LLMEngine], max_num_batched_tokens: int,
                 weights: Mapping[str, float] | None = None,
                 lenders: Collection[str] = (),
                 max_prefill_tokens_per_mixed_step: int | None =
                 DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP,
                 time_slice_s: float | None = DEFAULT_TIME_SLICE_S,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not members:
            raise ValueError("an engine group needs at least one member")
        for name, engine in members.items():
            if engine.runner is not runner:
                raise ValueError(f"member {name!r} does not share the group's runner")
        prefixes = [e.request_id_prefix for e in members.values()]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError(f"members need distinct request_id_prefix values, got {prefixes}")
        self.runner = runner
        self.members = dict(members)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_per_mixed_step = max_prefill_tokens_per_mixed_step
        self.weights = {m: float((weights or {}).get(m, 1.0)) for m in self.members}
        bad = [m for m, w in self.weights.items() if not w > 0]
        if bad:
            raise ValueError(f"weight of {bad[0]!r} must be > 0, got {self.weights[bad[0]]}")
        self.scheduled_tokens = dict.fromkeys(self.members, 0)   # per member, ever
        self.num_steps = 0
        # One cache: which members' ranges sleep (colocate/engine/cache_sleep.py).
        self.cache_sleep = CacheSleep()
        for name, engine in self.members.items():
            if engine.sleeping:
                raise ValueError(f"member {name!r} is asleep; wake it before grouping")
            engine.cache_sleep, engine.pool_name = self.cache_sleep, name
            self.cache_sleep.join(name, engine.scheduler)
        lenders = set(lenders)
        self.lending = self._lend(lenders)
        # Lenders first (see the module note); otherwise the members' own order.
        self.order = sorted(self.members, key=lambda m: m not in lenders)
        # clock: what times each step for the time shares (tests pass a fake one).
        self.time_shares = TimeShares(self.weights, time_slice_s, always_admitted=lenders,
                                      clock=clock)

    def _lend(self, lenders: set[str]) -> KVLending | None:
        unknown = sorted(lenders - set(self.members))
        if unknown:
            raise ValueError(f"lender {unknown[0]!r} is not a member; have {sorted(self.members)}")
        if not lenders:
            return None
        lending = KVLending()
        for name, engine in self.members.items():
            engine.kv.join_lending(lending, name, name in lenders, engine.scheduler)
        return lending

    def add_request(self, member: str, prompt, params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Add to one member. Request ids are unique across the group (the runner
        keys its per-request state by them); a member's own ids carry its name."""
        if member not in self.members:
            raise ValueError(f"no member {member!r} in this group; have {sorted(self.members)}")
        if request_id is not None and any(request_id in e.scheduler.requests
                                          for e in self.members.values()):
            raise ValueError(f"request_id {request_id!r} is already in use in this group")
        return self.members[member].add_request(prompt, params, request_id)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.members.values())

    # ---- sleep: members' ranges, or the whole cache (colocate/engine/cache_sleep.py)
    @property
    def sleeping(self) -> bool:
        """Every member asleep: the whole cache is given back."""
        return self.cache_sleep.sleeping

    def sleep(self) -> None:
        """Give the whole cache back; only when every member is idle. A member's next
        request wakes it (LLMEngine.add_request)."""
        self.cache_sleep.sleep(self.runner, self.members)

    def sleepable(self, members: Collection[str]) -> list[str]:
        """The members of `members` that may sleep now, together (idle, nothing lent,
        and where the device frees no range alone, only with every other member)."""
        return self.cache_sleep.sleepable(self.runner, members)

    def sleep_members(self, members: Collection[str]) -> None:
        """Give back these members' ranges while the others go on stepping; raises,
        changing nothing, unless sleepable(members) names them all."""
        self.cache_sleep.sleep(self.runner, members)

    def prefill_caps(self, served: Mapping[str, float],
                     joining: Collection[str]) -> dict[str, int] | None:
        """Each joining member's prefill tokens this step when one of them decodes in
        it (the cap split fairly by weight), or None when the step is not capped."""
        cap = self.max_prefill_tokens_per_mixed_step
        if cap is None or not any(self.members[m].scheduler.has_decode() for m in joining):
            return None
        wants = {m: self.members[m].scheduler.pending_split()[1] for m in joining}
        return fair_shares(wants, self.weights, cap, served)

    def _schedule(self, joining: Collection[str], served: Mapping[str, float]
                  ) -> list[GroupStep]:
        """Each joining member's part of this step, by token shares and prefill caps."""
        prefill = self.prefill_caps(served, joining)
        demands = {m: self.members[m].scheduler.pending_tokens(prefill and prefill[m])
                   for m in joining}
        shares = fair_shares(demands, self.weights, self.max_num_batched_tokens, served)
        parts = [GroupStep(m, self.members[m].scheduler.schedule(
                     shares[m], shares[m] if prefill is None else prefill[m]))
                 for m in self.order if shares.get(m, 0) > 0]
        return [p for p in parts if not p.sched.empty]

    def step(self) -> dict[str, list[RequestOutput]]:
        """One forward for every member's scheduled work; outputs per member."""
        served = {m: self.scheduled_tokens[m] / self.weights[m] for m in self.members}
        with_work = [m for m, e in self.members.items() if e.scheduler.pending_tokens()]
        joining = self.time_shares.admit(with_work)
        parts = self._schedule(joining, served)
        if not parts and len(joining) < len(with_work):
            # Those that may join can schedule nothing (a prompt waiting for blocks):
            # the step goes to everyone, so no member ever waits on one sitting out.
            parts = self._schedule(with_work, served)
        if not parts:
            return {}
        batch = SchedulerOutput(
            scheduled=[s for p in parts for s in p.sched.scheduled],
            preempted=[r for p in parts for r in p.sched.preempted])
        start = self.time_shares.clock()
        try:
            results = self.runner.execute(batch)
        except Exception as exc:
            raise GroupStepFailedError(
                {p.member: [s.request.request_id for s in p.sched.scheduled] for p in parts}
            ) from exc
        self.num_steps += 1
        self.time_shares.charge({p.member: p.sched.num_batched_tokens for p in parts},
                                self.time_shares.clock() - start)
        outputs = {}
        for p in parts:
            self.scheduled_tokens[p.member] += p.sched.num_batched_tokens
            outputs[p.member] = self.members[p.member].apply_step(p.sched, results)
        return outputs

