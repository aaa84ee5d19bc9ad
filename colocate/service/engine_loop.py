"""EngineLoop: the one thread that calls into the engines behind one or more fronts.

An engine is not thread-safe, so one thread does all of add_request, abort_request
and step; the fronts (AsyncEngine, one per service) only queue work under the
loop's lock. The loop drains every front's inbox before every step, so an abort
takes effect, and frees the request's blocks, before the next step runs.

What the loop steps is a Stepper: one LLMEngine (a service alone, one front), or an
EngineGroup (colocate/engine/group.py: several services of one model fused into
one batch, one front per member). Either way a step yields outputs per member
engine, and a failed step names the requests it held per member, so each front
fails only its own.

The loop never spins: with no request in any engine and nothing in any inbox it
sleeps on the condition variable until a submit, an abort or shutdown wakes it. A
step whose model run raises fails only the requests that step held; a run of
failed steps in a row declares the loop dead, since then the fault is in the
engine, not in one batch: every front's requests end and its health fails.

Sleep (`sleep_after_idle`): once the engine has held no request and no inbox has
had work for that long, the loop puts the engine to sleep (LLMEngine.sleep: the KV
pool's memory is given back); a group sleeps whole, since its members' pools are
ranges of one cache, and the first request of any member wakes it. Only this thread adds
requests to the engine, and it sleeps only between steps with nothing queued, so a
request is never caught by a sleep: one that arrives meanwhile waits in the inbox,
and adding it wakes the engine first (LLMEngine.add_request).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Protocol

from colocate.engine.engine import LLMEngine, StepFailedError
from colocate.engine.group import EngineGroup, GroupStepFailedError
from colocate.engine.outputs import RequestOutput
from colocate.service.engine_protocol import EngineDeadError

log = logging.getLogger(__name__)

# If an engine holds requests but schedules nothing (it should not happen: every
# admitted request fits its pool), wait this long before trying again rather
# than spinning on an empty step.
_STALL_WAIT_S = 0.005
# Failed steps in a row after which the loop is declared dead (and its process
# restarted by its supervisor): one bad batch is not a broken engine, three are.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class StepFailed(Exception):
    """A step raised; `request_ids` are the requests it held, per member engine, and
    `error` what the engine raised (StepFailedError or GroupStepFailedError)."""

    def __init__(self, request_ids: Mapping[LLMEngine, list[str]], error: Exception) -> None:
        super().__init__(f"step failed for {sum(map(len, request_ids.values()))} request(s)")
        self.request_ids = dict(request_ids)
        self.error = error


class _Stepper:
    """What the loop steps, `stepped`: an LLMEngine or an EngineGroup, which both count
    their steps (num_steps), know whether work is left (has_unfinished_requests) and
    sleep whole (sleeping, sleep); `members`: the engines whose requests it holds."""

    def __init__(self, stepped: LLMEngine | EngineGroup, members: tuple[LLMEngine, ...]) -> None:
        self.stepped = stepped
        self.members = members


class SingleEngine(_Stepper):
    """Stepper over one LLMEngine."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine, (engine,))
        self.engine = engine

    def step(self) -> dict[LLMEngine, list[RequestOutput]]:
        try:
            return {self.engine: self.engine.step()}
        except StepFailedError as exc:
            raise StepFailed({self.engine: exc.request_ids}, exc) from exc.__cause__


class FusedEngines(_Stepper):
    """Stepper over an EngineGroup: one batch for every member."""

    def __init__(self, group: EngineGroup) -> None:
        super().__init__(group, tuple(group.members.values()))
        self.group = group

    def step(self) -> dict[LLMEngine, list[RequestOutput]]:
        try:
            return {self.group.members[m]: outs for m, outs in self.group.step().items()}
        except GroupStepFailedError as exc:
            raise StepFailed({self.group.members[m]: ids for m, ids in exc.request_ids.items()},
                             exc) from exc.__cause__


class Front(Protocol):
    """What the loop needs of a front (AsyncEngine is the one there is)."""
    engine: LLMEngine

    def has_inbox(self) -> bool: ...
    def take_inbox(self) -> tuple[list, list]: ...
    def apply_inbox(self, adds: list, aborts: list) -> list[RequestOutput]: ...
    def fail_requests(self, request_ids: list[str]) -> None: ...
    def deliver(self, outputs: list[RequestOutput]) -> None: ...
    def end_everything(self, dead: EngineDeadError | None) -> None: ...


class EngineLoop:
    def __init__(self, stepper: SingleEngine | FusedEngines,
                 sleep_after_idle: float | None = None) -> None:
        if sleep_after_idle is not None and not sleep_after_idle > 0:
            raise ValueError(f"sleep_after_idle must be > 0 s, got {sleep_after_idle!r}")
        self.stepper = stepper
        self.sleep_after_idle = sleep_after_idle
        self.cond = threading.Condition()
        # Guarded by cond.
        self.fronts: dict[LLMEngine, Front] = {}
        self.stopping = False
        self.dead_reason: str | None = "engine not started"
        self.thread: threading.Thread | None = None

    def attach(self, front: Front) -> None:
        """Called by each front as it is built, before the loop starts."""
        if front.engine not in self.stepper.members:
            raise ValueError("the front's engine is not one this loop steps")
        with self.cond:
            if front.engine in self.fronts:
                raise ValueError("this engine already has a front")
            self.fronts[front.engine] = front

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        with self.cond:
            if self.stopping:
                raise EngineDeadError("engine shut down; build a new one to serve again")
            if self.thread is not None:
                return
            self.dead_reason = None
            self.thread = threading.Thread(target=self._run, name="colocate-engine-loop",
                                           daemon=True)
            self.thread.start()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Abort every front's requests (consumers get a final "abort" output),
        free every block and join the thread. Idempotent."""
        with self.cond:
            thread = self.thread
            self.stopping = True
            if self.dead_reason is None:
                self.dead_reason = "engine shut down"
            self.cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"engine loop did not stop within {timeout} s")
        else:
            self._end_every_front(error=None)     # never started: nothing else owns it

    def health_problem(self) -> str | None:
        """Under cond: why the loop cannot serve, or None."""
        if self.dead_reason is not None:
            return self.dead_reason
        if self.thread is not None and not self.thread.is_alive():
            return "engine loop thread exited"
        return None

    # ---- the thread ----------------------------------------------------------
    def _until_sleep(self, idle_since: float) -> float | None:
        """Seconds until the idle engine should sleep; None: never (not configured,
        or asleep already)."""
        if self.sleep_after_idle is None or self.stepper.stepped.sleeping:
            return None
        return idle_since + self.sleep_after_idle - time.monotonic()

    def _wait_for_work(self, wait: float | None, idle_since: float) -> bool:
        """Under cond: block until there is work or a stop; True when instead the
        idle time ran out, with nothing in any inbox and no request in the engine."""
        while not (self.stopping or wait is not None
                   or any(f.has_inbox() for f in self.fronts.values())):
            left = self._until_sleep(idle_since)
            if left is not None and left <= 0:
                return True
            self.cond.wait(left)
        return False

    def _fall_asleep(self) -> None:
        """Loop thread, idle: give the pool back; the fronts' stats say `sleeping`."""
        self.stepper.stepped.sleep()
        log.info("engine idle for %.1f s: KV pool released until the next request",
                 self.sleep_after_idle)
        with self.cond:
            for front in self.fronts.values():
                front.deliver([])

    def _run(self) -> None:
        error: BaseException | None = None
        wait: float | None = None          # None: sleep until notified
        failed_in_a_row = 0
        idle_since = time.monotonic()      # no request in the engine since then
        try:
            while True:
                with self.cond:
                    idle_too_long = self._wait_for_work(wait, idle_since)
                    if self.stopping:
                        break
                if idle_too_long:
                    self._fall_asleep()
                    continue
                with self.cond:
                    if wait:
                        self.cond.wait(wait)
                    inboxes = [(f, f.take_inbox()) for f in self.fronts.values()]
                outputs = {f.engine: f.apply_inbox(*box) for f, box in inboxes}
                steps_before = self.stepper.stepped.num_steps
                if self.stepper.stepped.has_unfinished_requests():
                    try:
                        for engine, outs in self.stepper.step().items():
                            outputs[engine] += outs
                        failed_in_a_row = 0
                    except StepFailed as exc:
                        failed_in_a_row += 1
                        if failed_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
                            raise exc.error
                        log.error("engine step failed (%d in a row); failing its %d "
                                  "request(s)", failed_in_a_row,
                                  sum(map(len, exc.request_ids.values())),
                                  exc_info=exc.__cause__)
                        for engine, ids in exc.request_ids.items():
                            self.fronts[engine].fail_requests(ids)
                with self.cond:
                    for engine, outs in outputs.items():
                        self.fronts[engine].deliver(outs)
                if not self.stepper.stepped.has_unfinished_requests():
                    wait = None
                    idle_since = time.monotonic()
                else:
                    wait = 0.0 if self.stepper.stepped.num_steps > steps_before else _STALL_WAIT_S
        except Exception as exc:     # the engine is broken: fail every request
            log.exception("engine loop failed; aborting every request")
            error = exc
        finally:
            self._end_every_front(error)

    def _end_every_front(self, error: BaseException | None) -> None:
        with self.cond:
            if error is not None:
                # The type only: this text reaches clients (UNAVAILABLE), and an
                # exception's message may hold addresses or data; the log has it all.
                self.dead_reason = f"engine loop failed: {type(error).__name__}"
            self.stopping = True
            fronts = list(self.fronts.values())
        for front in fronts:
            front.end_everything(EngineDeadError(self.dead_reason) if error is not None else None)
