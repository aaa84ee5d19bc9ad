"""TimeShares: the engine time each member of a fused group has used, and who joins a step.

Token shares (group.fair_shares) split every step's token budget fairly, but a step's
cost is not its token count alone. On a CPU a decode row of the batch costs about as
much compute as the weights' read (a step of twelve rows took 4.5x the time of one,
docs/benchmarks.md), and a 256-token prompt chunk costs thirty one-row steps. So a
service with one request beside a neighbour's eight decodes and their prompts waits,
token after token, for work that is almost all the neighbour's: measured through
bench/colocation.py's flood, 4.3x its latency alone, though it got every token it
asked for in every step.

The group therefore also keeps engine time, per member and per unit of weight, in the
spirit of VTC (Sheng et al., OSDI'24) with time as the cost: each step's wall time is
charged to the members in it in proportion to their scheduled tokens, and a member
with work joins the next step only while its time is within `slice_s` of the least
served member with work. A member that leads sits out steps (its requests keep their
blocks; nothing is preempted) until the others catch up, so over any window in which
two members both have work, each gets at least about half the engine's time, whatever
the other's batch costs: a light service's latency stays within about 2x of alone.
A member that comes back after being idle is lifted to the least served active
member's time (VTC's rule), so idleness banks no credit to spend in a burst later.

`slice_s` sets how long one member may lead before it sits out: larger keeps more
steps batched (a fused group's point), smaller holds every member's wait closer to its
share. Lenders always join (colocate/engine/kv_lending.py): their blocks come back
within one step, which a lender sitting out would break.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

DEFAULT_TIME_SLICE_S = 0.1


class TimeShares:
    def __init__(self, weights: Mapping[str, float], slice_s: float | None = DEFAULT_TIME_SLICE_S,
                 always_admitted: Collection[str] = (),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """slice_s: a member's lead past which it sits out (None: nobody ever does)."""
        if slice_s is not None and not slice_s >= 0:
            raise ValueError(f"time slice must be >= 0 seconds, got {slice_s}")
        self.weights = dict(weights)
        self.slice_s = slice_s
        self.always_admitted = frozenset(always_admitted)
        self.clock = clock
        self.used = dict.fromkeys(self.weights, 0.0)     # seconds charged / weight, ever
        self._active: set[str] = set()

    def admit(self, with_work: Collection[str]) -> set[str]:
        """Of the members with work this step, those that may join it."""
        with_work = set(with_work)
        if not with_work:
            self._active = set()
            return set()
        still = with_work & self._active
        if still:                            # newcomers start level with the least served
            floor = min(self.used[m] for m in still)
            for m in with_work - still:
                self.used[m] = max(self.used[m], floor)
        self._active = with_work
        if self.slice_s is None:
            return with_work
        least = min(self.used[m] for m in with_work)
        return {m for m in with_work
                if m in self.always_admitted or self.used[m] - least <= self.slice_s}

    def charge(self, tokens: Mapping[str, int], seconds: float) -> None:
        """A step of `seconds` ran these members' tokens: each pays its part."""
        total = sum(tokens.values())
        if not total:
            return
        for m, n in tokens.items():
            self.used[m] += seconds * n / total / self.weights[m]
