"""CacheSleep: which pools of a runner's KV cache are asleep, their memory given back.

An engine alone has one pool in its runner's cache; the members of an engine group
(group.py) each have a block range of one shared cache. A pool sleeps only when its
scheduler is idle (a request in flight would lose its KV values), and every cached
prefix of it is forgotten, since its values are gone. What is given back:

- every pool asleep: the whole cache is freed (runner.free_kv_cache); the first
  pool to wake maps it again. If others still sleep, the cache is mapped without
  touching its pages and only the waking pool's range is made resident, so the
  sleepers' ranges stay given back.
- one member of a group, the others awake (CPU only, runner.can_drop_kv_blocks):
  the whole pages of its block range are given back (runner.drop_kv_blocks) while
  the others keep stepping; waking zeroes its range (runner.zero_kv_blocks), which
  makes it resident again, before its next request is added. On CUDA one allocation
  cannot be freed in part, so there the members sleep only all together, and the
  first request of any of them wakes them all.
- a lender sleeps only once none of its blocks is lent (its loans end when the
  borrowers' requests finish); asleep, it lends nothing (kv_lending.py), since its
  free blocks' memory is given back and waking zeroes them.

It holds the schedulers, not the engines, so that engines and their groups form no
reference cycle: an engine dropped with requests still in it is freed at once.
"""
from __future__ import annotations

from collections.abc import Collection

from colocate.engine.scheduler import Scheduler


class CacheSleep:
    def __init__(self) -> None:
        self.pools: dict[str, Scheduler] = {}      # name -> the scheduler of that pool
        self.asleep: set[str] = set()

    def join(self, name: str, scheduler: Scheduler) -> None:
        self.pools[name] = scheduler

    @property
    def sleeping(self) -> bool:
        """Every pool asleep: the whole cache is given back."""
        return self.asleep == set(self.pools)

    def is_asleep(self, name: str) -> bool:
        return name in self.asleep

    # ---- which pools may sleep, and sleeping them --------------------------------
    def why_not(self, runner, name: str, with_: Collection[str] = ()) -> str | None:
        """Why pool `name` cannot sleep now, with the pools `with_` sleeping at the
        same time; None if it can."""
        scheduler = self.pools[name]
        where = f" in {name}" if len(self.pools) > 1 else ""
        if scheduler.has_unfinished():
            running, waiting = scheduler.queue_lengths()
            return f"{running} running and {waiting} waiting request(s){where}"
        if scheduler.kv.num_lent_blocks:
            return f"{scheduler.kv.num_lent_blocks} block(s){where} are lent"
        alone = set(self.pools) - self.asleep - {name} - set(with_)
        if alone and not runner.can_drop_kv_blocks:
            return (f"{name} shares one KV cache allocation with {sorted(alone)}, which "
                    "this device cannot free in part: its members sleep together")
        return None

    def sleepable(self, runner, names: Collection[str]) -> list[str]:
        """The pools of `names` (awake ones) that may sleep now, together."""
        ok = [n for n in names if n not in self.asleep]
        while True:                   # one left out may be what another waited for
            fewer = [n for n in ok if self.why_not(runner, n, ok) is None]
            if fewer == ok:
                return ok
            ok = fewer

    def sleep(self, runner, names: Collection[str]) -> bool:
        """Give back the memory of pools `names`; False if all are asleep already.
        Raises, changing nothing, if any of them cannot sleep now."""
        names = [n for n in names if n not in self.asleep]
        if not names:
            return False
        for name in names:
            problem = self.why_not(runner, name, names)
            if problem is not None:
                raise RuntimeError(f"cannot sleep: {problem}")
        for name in names:
            self.pools[name].kv.sleep()
        self.asleep.update(names)
        if self.sleeping:
            runner.free_kv_cache()
        else:
            for name in names:
                runner.drop_kv_blocks(*self._range(name))
        return True

    def wake(self, runner, name: str) -> bool:
        """Take pool `name`'s memory back, zeroed, if asleep; True if it was. Where
        the device cannot free a range alone, every pool wakes with it."""
        if name not in self.asleep:
            return False
        waking = {name} if runner.can_drop_kv_blocks else set(self.asleep)
        if self.sleeping:
            others_sleep = bool(self.asleep - waking)
            runner.allocate_kv_cache(resident=not others_sleep)
            if others_sleep:
                runner.zero_kv_blocks(*self._range(name))
        else:
            for pool in waking:
                runner.zero_kv_blocks(*self._range(pool))
        self.asleep -= waking
        for pool in waking:
            self.pools[pool].kv.wake()
        return True

    def _range(self, name: str) -> tuple[int, int]:
        """(first block id, blocks) of the pool's range in the cache."""
        pool = self.pools[name].kv.pool
        return pool.first_block_id, pool.num_usable_blocks
