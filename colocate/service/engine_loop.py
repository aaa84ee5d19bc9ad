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

Sleep (`sleep_after_idle`, per member engine): once a member has held no request
and its inbox has had no work for that long, the loop puts it to sleep (its KV
pool's memory is given back: colocate/engine/cache_sleep.py), while the group's
other members go on stepping; where a member cannot sleep yet (a lender with blocks
lent, or a device that frees a group's cache only whole, so the member waits for
the others), it is asked again after every step and when the next member falls due.
Only this thread adds requests to an engine, and it sleeps a member only between
steps with that member's inbox empty, so a request is never caught by a sleep: one
that arrives meanwhile waits in the inbox, and adding it wakes the member first
(LLMEngine.add_request).

Threads (`intra_op_threads`). This thread is the process's one multi-threaded
computer: it sets torch's intra-op threads for itself when it starts, and the
service runtimes keep the thread that builds the engine at one (see
colocate/service/runtime.py). OpenMP gives every thread that opens a parallel region
a team of its own, and once the teams of a process outnumber the cores, GNU OpenMP
stops spinning at barriers and sleeps instead: a team left behind by the thread that
built the model made every product of the loop's steps wait on a futex wake-up.
Measured on a Zen 4 (2 cores, three fused SmolLM2 services, offline): a mean latency
of 3.9 s against 1.2 s with one team.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Protocol

import torch

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
    their steps (num_steps) and know whether work is left (has_unfinished_requests);
    `members`: the engines whose requests it holds, each of which sleeps (sleepable,
    sleep)."""

    def __init__(self, stepped: LLMEngine | EngineGroup, members: tuple[LLMEngine, ...]) -> None:
        self.stepped = stepped
        self.members = members


class SingleEngine(_Stepper):
    """Stepper over one LLMEngine."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine, (engine,))
        self.engine = engine

    def sleepable(self, engines: list[LLMEngine]) -> list[LLMEngine]:
        return [e for e in engines if e.can_sleep()]

    def sleep(self, engines: list[LLMEngine]) -> None:
        for engine in engines:
            engine.sleep()

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

    def sleepable(self, engines: list[LLMEngine]) -> list[LLMEngine]:
        ok = set(self.group.sleepable([e.pool_name for e in engines]))
        return [e for e in engines if e.pool_name in ok]

    def sleep(self, engines: list[LLMEngine]) -> None:
        self.group.sleep_members([e.pool_name for e in engines])

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
                 sleep_after_idle: float | Mapping[LLMEngine, float | None] | None = None,
                 intra_op_threads: int | None = None) -> None:
        """sleep_after_idle: seconds, for every member, or per member engine; None: never.
        intra_op_threads: torch's threads in the loop's thread (None: as inherited)."""
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        self.intra_op_threads = intra_op_threads
        after = (dict(sleep_after_idle) if isinstance(sleep_after_idle, Mapping)
                 else dict.fromkeys(stepper.members, sleep_after_idle))
        if set(after) - set(stepper.members):
            raise ValueError("sleep_after_idle names an engine this loop does not step")
        for seconds in after.values():
            if seconds is not None and not seconds > 0:
                raise ValueError(f"sleep_after_idle must be > 0 s, got {seconds!r}")
        self.stepper = stepper
        self.sleep_after_idle = {e: after.get(e) for e in stepper.members}
        # Loop thread only: since when each member has had no request and no inbox work.
        self.idle_since = dict.fromkeys(stepper.members, time.monotonic())
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
    def _sleep_due(self) -> tuple[list[LLMEngine], float | None]:
        """Under cond: the awake members idle past their sleep_after_idle with an empty
        inbox, and seconds until the next other member falls due (None: none will)."""
        now, due, left = time.monotonic(), [], None
        for engine, after in self.sleep_after_idle.items():
            front = self.fronts.get(engine)
            if (after is None or engine.sleeping or engine.has_unfinished_requests()
                    or (front is not None and front.has_inbox())):
                continue
            remaining = self.idle_since[engine] + after - now
            if remaining <= 0:
                due.append(engine)
            else:
                left = remaining if left is None else min(left, remaining)
        return due, left

    def _wait_for_work(self, wait: float | None) -> None:
        """Under cond: block until there is work, a stop, or a member that may sleep."""
        while not (self.stopping or wait is not None
                   or any(f.has_inbox() for f in self.fronts.values())):
            due, left = self._sleep_due()
            if due and self.stepper.sleepable(due):
                return
            self.cond.wait(left)

    def _fall_asleep(self, due: list[LLMEngine]) -> None:
        """Loop thread: give back the pools of the due members that may sleep now;
        their fronts' stats say `sleeping`."""
        engines = self.stepper.sleepable(due)
        if not engines:
            return
        self.stepper.sleep(engines)
        log.info("%d engine(s) idle past sleep_after_idle: KV pool released until their "
                 "next request", len(engines))
        with self.cond:
            for engine in engines:
                if engine in self.fronts:
                    self.fronts[engine].deliver([])

    def _run(self) -> None:
        if self.intra_op_threads is not None:
            torch.set_num_threads(self.intra_op_threads)
        error: BaseException | None = None
        wait: float | None = None          # None: sleep until notified
        failed_in_a_row = 0
        try:
            while True:
                with self.cond:
                    self._wait_for_work(wait)
                    if self.stopping:
                        break
                    due, _ = self._sleep_due()
                if due:
                    self._fall_asleep(due)
                with self.cond:
                    if wait:
                        self.cond.wait(wait)
                    inboxes = [(f, f.take_inbox()) for f in self.fronts.values()]
                outputs = {f.engine: f.apply_inbox(*box) for f, box in inboxes}
                # Members with work this round: their idle time starts again after it.
                worked = {f.engine for f, (adds, aborts) in inboxes if adds or aborts}
                worked.update(e for e in self.stepper.members if e.has_unfinished_requests())
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
                now = time.monotonic()
                for engine in worked:
                    self.idle_since[engine] = now
                if not self.stepper.stepped.has_unfinished_requests():
                    wait = None
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
