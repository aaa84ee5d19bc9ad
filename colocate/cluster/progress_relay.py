"""The supervisors' progress, shown on the driver's terminal while they work.

A supervisor is a Ray actor in another process (often on another node): its loading,
publishing and starting stages are recorded there (progress.Recorder) and polled from
here while the driver waits on it, then replayed into the driver's reporter, each
stage prefixed with its device entry: one line per entry and model.
"""
from __future__ import annotations

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from colocate import progress

POLL_S = 0.25


class ProgressRelay:
    """Replays each supervisor's new events into `reporter`; a cursor per entry."""

    def __init__(self, supervisors: dict[str, object], reporter: progress.Reporter):
        self.supervisors = supervisors          # entry name -> supervisor actor
        self.reporter = reporter
        self._seen = {entry: 0 for entry in supervisors}
        self._keys: dict[str, dict] = {entry: {} for entry in supervisors}

    def poll(self) -> None:
        refs = {entry: actor.progress_events.remote(self._seen[entry])
                for entry, actor in self.supervisors.items()}
        for entry, ref in refs.items():
            try:
                events = ray.get(ref, timeout=10.0)
            except (RayActorError, GetTimeoutError):
                continue                        # a failing supervisor speaks for itself
            self._seen[entry] += len(events)
            progress.replay(events, self.reporter, f"{entry}: ", self._keys[entry])

    def get(self, refs: list):
        """ray.get(refs), showing the supervisors' progress until every ref is done."""
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            self.poll()
        return ray.get(refs)
