"""Requests a service refused, counted by reason.

The gRPC layer calls `add(reason)` from its handler threads when it refuses a call;
the service reports the counts at scrape time.
"""
from __future__ import annotations

import threading

# auth: no or unknown bearer token; invalid: a bad field (sampling, prompt ids);
# too_long: prompt + max_tokens over max_model_len or the whole KV pool;
# overloaded: the service's queue is full.
REJECT_REASONS = ("auth", "invalid", "too_long", "overloaded")


class RejectionCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()      # many gRPC threads add at once
        self._counts = dict.fromkeys(REJECT_REASONS, 0)

    def add(self, reason: str) -> None:
        if reason not in self._counts:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REJECT_REASONS}")
        with self._lock:
            self._counts[reason] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
