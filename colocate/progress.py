"""Progress of long work (loading, quantizing, publishing, starting), told to whoever watches.

Code that does long work opens a stage and advances it:

    with progress.stage("loading", total=len(tensors), unit="tensor") as bar:
        for t in tensors:
            ...
            bar.advance(1, nbytes=t.nbytes)

and knows nothing of where it shows. The reporter in effect (a context variable, so
each thread has its own) decides:

  Bars       a tqdm bar per stage on a terminal (what HF transformers and vLLM show);
  Lines      one line per stage once it ends, for logs (the default off a terminal);
  Recorder   keeps the events, so a Ray actor (the supervisor) can hand them to the
             driver, which replays them into its own reporter (replay());
  Silent     nothing (--quiet).

`labelled("smollm2")` prefixes the stages opened inside it, so the loaders below need
not know which model or device they serve.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import threading
import time
from typing import Iterator, TextIO

log = logging.getLogger(__name__)

MIB = 2**20
# A stage of known size: a bar and the count; of unknown size: the count and its rate.
# tqdm puts ", " before a postfix (the bytes so far) itself.
BAR = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{unit}{postfix} [{elapsed}]"
COUNTER = "{desc}: {n_fmt}{unit}{postfix} [{elapsed}, {rate_fmt}]"


class Reporter:
    """Where stages show; each method gets the stage's key (unique per reporter)."""

    def begin(self, key: int, desc: str, total: int | None, unit: str) -> None: ...

    def advance(self, key: int, n: int, nbytes: int) -> None: ...

    def end(self, key: int) -> None: ...


class Silent(Reporter):
    pass


class Bars(Reporter):
    """One tqdm bar per stage, left on screen when it ends: one line per stage."""

    def __init__(self, file: TextIO | None = None):
        self.file = file
        self._bars: dict = {}
        self._bytes: dict[int, int] = {}

    def begin(self, key, desc, total, unit):
        from tqdm import tqdm

        stream = self.file or sys.stderr
        cols, rows = _screen(stream)
        self._bars[key] = tqdm(total=total, desc=desc, unit=f" {unit}s", leave=True,
                               file=stream, ncols=cols, nrows=rows,
                               bar_format=BAR if total is not None else COUNTER)
        self._bytes[key] = 0

    def advance(self, key, n, nbytes):
        bar = self._bars[key]
        if nbytes:
            self._bytes[key] += nbytes
            bar.set_postfix_str(f"{self._bytes[key] / MIB:.0f} MiB", refresh=False)
        bar.update(n)

    def end(self, key):
        self._bars.pop(key).close()
        self._bytes.pop(key)


class Lines(Reporter):
    """One line per stage when it ends: what was done, how much, how long. Printed to
    `file`, or logged (INFO, logger colocate.progress) when there is none."""

    def __init__(self, file: TextIO | None = None):
        self.file = file
        self._open: dict[int, list] = {}         # key -> [desc, unit, count, bytes, began]

    def begin(self, key, desc, total, unit):
        self._open[key] = [desc, unit, 0, 0, time.monotonic()]

    def advance(self, key, n, nbytes):
        self._open[key][2] += n
        self._open[key][3] += nbytes

    def end(self, key):
        desc, unit, count, nbytes, began = self._open.pop(key)
        size = f", {nbytes / MIB:.1f} MiB" if nbytes else ""
        line = (f"{desc}: {count} {unit}{'' if count == 1 else 's'}{size} "
                f"in {time.monotonic() - began:.1f} s")
        if self.file is not None:
            print(line, file=self.file, flush=True)
        else:
            log.info("%s", line)


class Recorder(Reporter):
    """Keeps every event (thread-safe), for events(since) to hand on; also what the
    tests count with."""

    def __init__(self):
        self._lock = threading.Lock()
        self._events: list[tuple] = []

    def begin(self, key, desc, total, unit):
        self._add(("begin", key, desc, total, unit))

    def advance(self, key, n, nbytes):
        self._add(("advance", key, n, nbytes))

    def end(self, key):
        self._add(("end", key))

    def _add(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)

    def events(self, since: int = 0) -> list[tuple]:
        """The events from index `since` on (a poller passes how many it has seen)."""
        with self._lock:
            return self._events[since:]

    def totals(self) -> dict[str, tuple[int, int, int]]:
        """desc -> (total announced, count advanced, bytes advanced), per ended stage."""
        out, open_ = {}, {}
        for event in self.events():
            if event[0] == "begin":
                open_[event[1]] = [event[2], event[3], 0, 0]
            elif event[0] == "advance":
                open_[event[1]][2] += event[2]
                open_[event[1]][3] += event[3]
            else:
                desc, total, count, nbytes = open_.pop(event[1])
                out[desc] = (total, count, nbytes)
        return out


def replay(events: list[tuple], into: Reporter, prefix: str = "",
           keys: dict | None = None) -> None:
    """Re-tell another process's recorded events to `into`, descriptions prefixed.
    keys maps the sender's keys to this process's, across calls for one sender."""
    keys = {} if keys is None else keys
    for event in events:
        kind, key = event[0], event[1]
        if kind == "begin":
            keys[key] = _new_key()
            into.begin(keys[key], f"{prefix}{event[2]}", event[3], event[4])
        elif kind == "advance":
            into.advance(keys[key], event[2], event[3])
        else:
            into.end(keys.pop(key))


def auto(file: TextIO | None = None, quiet: bool = False) -> Reporter:
    """Bars when `file` (default stderr) is a terminal, else Lines; Silent if quiet.
    Off a terminal the lines go to `file` when one was given, else to the log."""
    if quiet:
        return Silent()
    stream = file or sys.stderr
    if _isatty(stream):
        return Bars(stream)
    return Lines(file)


def _screen(stream) -> tuple[int, int]:
    """The terminal's columns and rows; 80 x 24 where it reports none (a fresh
    pseudo-terminal says 0 x 0, and tqdm hides every bar below row 0)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return size.columns or 80, size.lines or 24
    except (AttributeError, ValueError, OSError):
        return 80, 24


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):      # a closed or file-less stream
        return False


_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar(
    "colocate_progress_reporter", default=None)
_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("colocate_progress_prefix",
                                                              default="")
_keys = iter(range(1, 2**62))
_keys_lock = threading.Lock()


def _new_key() -> int:
    with _keys_lock:
        return next(_keys)


def current() -> Reporter:
    """The reporter in effect here: the one using() set, else auto()."""
    return _reporter.get() or auto()


@contextlib.contextmanager
def using(reporter: Reporter) -> Iterator[Reporter]:
    """Stages opened in this block (in this thread) go to `reporter`."""
    token = _reporter.set(reporter)
    try:
        yield reporter
    finally:
        _reporter.reset(token)


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Stages opened in this block are described as `label` + their own description."""
    token = _prefix.set(f"{_prefix.get()}{label} ")
    try:
        yield
    finally:
        _prefix.reset(token)


class Stage:
    """One stage of work: advance() as it goes; closing it ends the line."""

    def __init__(self, reporter: Reporter, desc: str, total: int | None, unit: str):
        self.reporter, self.key = reporter, _new_key()
        reporter.begin(self.key, desc, total, unit)

    def advance(self, n: int = 1, nbytes: int = 0) -> None:
        self.reporter.advance(self.key, n, nbytes)

    def close(self) -> None:
        self.reporter.end(self.key)

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stage(desc: str, total: int | None, unit: str) -> Stage:
    """Open a stage of `total` `unit`s (None: not known ahead) on the reporter in effect."""
    return Stage(current(), f"{_prefix.get()}{desc}", total, unit)
