"""SharedLedger: what every supervisor on one device has booked, in one file.

Each supervisor keeps its own MemoryArbiter, and on its own each would book the
whole device. Two supervisors can share a device: two `colocate serve` runs on one
host, or two deployments of one Ray cluster placed on the same node. The shared
ledger is where they meet: a small JSON file per device under /dev/shm, read and
written only while holding an exclusive flock on a lock file beside it. Admission
is read, check and write inside that one lock, so two admissions can never both
count the same free bytes.

A file rather than a named Ray actor because two `colocate serve` runs have two
separate Ray clusters, and only the host is common to them.

Every entry carries its holder's pid and process start time. Entries whose process
is gone (a supervisor killed before it could clean up) are dropped at every read,
and the kernel releases a flock when its holder dies, so a crash never wedges the
device.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fcntl
import psutil

LEDGER_DIR_ENV = "COLOCATE_LEDGER_DIR"
FILE_PREFIX = "colocate-ledger-"


def default_dir() -> Path:
    """$COLOCATE_LEDGER_DIR, else /dev/shm (RAM, shared by the host's processes),
    else the temp directory."""
    if os.environ.get(LEDGER_DIR_ENV):
        return Path(os.environ[LEDGER_DIR_ENV])
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(entry: dict) -> bool:
    """Same pid and same start time: the same process (pids are reused)."""
    started = _process_started(entry["pid"])
    return started is not None and abs(started - (entry["started"] or 0)) < 1.0


class SharedLedger:
    """One holder's view of a device's shared ledger.

    Use `transaction()` for every read-modify-write; within it, `others_bytes` and
    `book` read and set the bookings."""

    def __init__(self, device_key: str, directory: str | Path | None = None,
                 label: str = "") -> None:
        root = Path(directory) if directory is not None else default_dir()
        root.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", device_key)
        self.path = root / f"{FILE_PREFIX}{safe}.json"
        self.lock_path = root / f"{FILE_PREFIX}{safe}.lock"
        self.label = label
        self.pid = os.getpid()
        self.started = _process_started(self.pid)
        # pid alone is not unique: one process may hold several supervisors' views.
        self.holder = f"{self.pid}-{secrets.token_hex(4)}"

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict]:
        """Hold the device's lock; yield the live entries (holder -> entry), and
        write them back when the block ends without an error."""
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = self._read_live()
                yield entries
                self._write(entries)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def others_bytes(self, entries: dict) -> int:
        return sum(e["bytes"] for holder, e in entries.items() if holder != self.holder)

    def others(self, entries: dict) -> list[str]:
        return [e["label"] for holder, e in entries.items() if holder != self.holder]

    def book(self, entries: dict, nbytes: int) -> None:
        entries[self.holder] = dict(pid=self.pid, started=self.started, bytes=int(nbytes),
                                    label=self.label)

    def remove(self) -> None:
        """Drop this holder's entry (its supervisor is stopping)."""
        with self.transaction() as entries:
            entries.pop(self.holder, None)

    def _read_live(self) -> dict:
        try:
            entries = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return {}
        except ValueError:          # torn by a crash mid-write: nothing in it is trusted
            return {}
        return {h: e for h, e in entries.items() if _alive(e)}

    def _write(self, entries: dict) -> None:
        # Written aside and renamed, so the file on disk is always whole.
        scratch = self.path.with_suffix(f".tmp-{self.holder}")
        scratch.write_text(json.dumps(entries, sort_keys=True))
        os.replace(scratch, self.path)
