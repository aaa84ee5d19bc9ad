"""Faults a test can inject into a running service, to see that the rest survives.

A deployment launched with `test_hooks=HOOKS` (below) makes one FaultInjector in each
service process through the seam colocate/service/test_hooks.py; a service launched
without it refuses `inject_fault`, so production code cannot be made to fail by a call
that happens to reach it. Each fault is armed for a number of occurrences:

- "step":      the next model steps raise (with `message`, so a test can plant text
               that must never reach a client);
- "ping_fail": the next health pings answer "not serving";
- "ping_hang": the next health pings sleep `seconds` before answering.
"""
from __future__ import annotations

import threading
import time

KINDS = ("step", "ping_fail", "ping_hang")
HOOKS = "tests.faults:FaultInjector"     # what Deployment(..., test_hooks=) takes


class InjectedFault(RuntimeError):
    pass


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, int] = {}
        self._message = "injected fault"
        self._seconds = 0.0

    def arm(self, kind: str, count: int = 1, *, message: str = "injected fault",
            seconds: float = 0.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._lock:
            self._armed[kind] = count
            self._message, self._seconds = message, seconds

    def take(self, kind: str) -> bool:
        """True (and one fewer armed) if `kind` is armed."""
        with self._lock:
            if self._armed.get(kind, 0) <= 0:
                return False
            self._armed[kind] -= 1
            return True

    def on_step(self) -> None:
        if self.take("step"):
            raise InjectedFault(self._message)

    def on_ping(self) -> bool:
        """False for a failed ping; sleeps first for a hung one."""
        if self.take("ping_hang"):
            time.sleep(self._seconds)
        return not self.take("ping_fail")

    def wrap_runner(self, runner) -> "FaultyRunner":
        return FaultyRunner(runner, self)


class FaultyRunner:
    """A model runner that consults the injector before every step."""

    def __init__(self, runner, injector: FaultInjector) -> None:
        self._runner = runner
        self._injector = injector

    def execute(self, sched):
        self._injector.on_step()
        return self._runner.execute(sched)

    def __getattr__(self, name):          # release() and anything else: the real runner
        return getattr(self._runner, name)
