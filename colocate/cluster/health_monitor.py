"""HealthMonitor: pings a supervisor's services and says which must be restarted.

Every `interval_s` it pings each running service (all at once, one shared
deadline) and judges the answers:

- the actor is gone (Ray says it died): restart now, there is nothing to wait for;
- the ping failed (the engine loop is not serving) or did not answer within
  `timeout_s`: one more failed check; restart after `failures_before_restart` in a
  row. A single slow answer (a long prefill holding the GIL) or one bad reading is
  not worth killing the requests in flight;
- a good answer resets the count.

A service left `failed` (its restart was refused or it did not come up) is tried
again every round. The restart itself is the supervisor's: it owns the ledger and
the actors.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from colocate.service.runtime import ServiceLaunch

log = logging.getLogger(__name__)


@dataclass
class ServiceSlot:
    """One service as its supervisor tracks it."""
    launch: ServiceLaunch
    actor: object | None = None
    state: str = "starting"          # starting | running | restarting | failed | stopped
    restarts: int = 0
    failed_checks: int = 0           # in a row
    error: str = ""
    last_restart_s: float | None = None   # from the decision to restart to healthy

    @property
    def name(self) -> str:
        return self.launch.spec.name


def summary(exc: BaseException) -> str:
    """The last line of a (possibly remote) error: Ray puts the cause there."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


class HealthMonitor:
    def __init__(self, slots: Callable[[], list[ServiceSlot]],
                 restart: Callable[[ServiceSlot], None], *, interval_s: float,
                 timeout_s: float, failures_before_restart: int, name: str) -> None:
        """slots(): the services to watch now; restart(slot): replace one."""
        self._slots = slots
        self._restart = restart
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures_before_restart = failures_before_restart
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name=f"health-{self._name}")
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_once()
            except Exception:        # never let one bad round end the checks
                log.exception("health check on %s failed", self._name)

    def check_once(self) -> list[str]:
        """One round: ping, judge, restart. Returns the names restarted."""
        slots = [s for s in self._slots() if s.state in ("running", "failed")]
        pings = [(s, s.actor.ping.remote()) for s in slots if s.state == "running"]
        doomed = [s for s in slots if s.state == "failed"]
        deadline = time.monotonic() + self.timeout_s
        for slot, ref in pings:
            if not self._judge(slot, ref, max(0.0, deadline - time.monotonic())):
                doomed.append(slot)
        for slot in doomed:
            if not self._stop.is_set():
                self._restart(slot)
        return [s.name for s in doomed]

    def _judge(self, slot: ServiceSlot, ref, timeout: float) -> bool:
        """False when the slot must be restarted now."""
        try:
            healthy = bool(ray.get(ref, timeout=timeout))
            why = "" if healthy else "engine not serving"
        except RayActorError as exc:
            slot.error = f"died: {summary(exc)}"
            return False
        except GetTimeoutError:
            healthy, why = False, f"no answer within {self.timeout_s:g} s"
        if healthy:
            slot.failed_checks = 0
            return True
        slot.failed_checks += 1
        slot.error = f"{why} ({slot.failed_checks} failed checks in a row)"
        log.warning("service %s: %s", slot.name, slot.error)
        return slot.failed_checks < self.failures_before_restart
