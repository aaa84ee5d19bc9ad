"""CacheSleep: whether a runner's KV cache is allocated, for every pool inside it.

An engine alone has one pool in its runner's cache; the members of an engine group
(group.py) each have a block range of one shared cache. The cache is one allocation,
so its pools sleep and wake together: it is freed only when every pool's scheduler is
idle (a request in flight would lose its KV values) and taken back, zeroed, by the
first request of any of them. Every cached prefix is forgotten on sleep, since its
values are gone.

It holds the schedulers, not the engines, so that engines and their groups form no
reference cycle: an engine dropped with requests still in it is freed at once.
"""
from __future__ import annotations

from colocate.engine.scheduler import Scheduler


class CacheSleep:
    def __init__(self) -> None:
        self.sleeping = False
        self.pools: dict[str, Scheduler] = {}      # name -> the scheduler of that pool

    def join(self, name: str, scheduler: Scheduler) -> None:
        self.pools[name] = scheduler

    def sleep(self, runner) -> bool:
        """Free runner's cache; False if asleep already. Raises if any pool is busy."""
        if self.sleeping:
            return False
        for name, scheduler in self.pools.items():
            if scheduler.has_unfinished():
                where = f" in {name}" if len(self.pools) > 1 else ""
                running, waiting = scheduler.queue_lengths()
                raise RuntimeError(f"cannot sleep: {running} running and "
                                   f"{waiting} waiting request(s){where}")
        for scheduler in self.pools.values():
            scheduler.kv.forget_contents()
        runner.free_kv_cache()
        self.sleeping = True
        return True

    def wake(self, runner) -> bool:
        """Take runner's cache back if asleep; True if it was."""
        if not self.sleeping:
            return False
        runner.allocate_kv_cache()
        self.sleeping = False
        return True
