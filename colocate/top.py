"""`colocate top`: a live view of a running deployment, from its devices' /metrics.

Every `interval` seconds it scrapes each device endpoint (the URLs `colocate serve`
prints, or every metrics_port of a deployment YAML on 127.0.0.1) and redraws the
screen (colocate/top_view.py computes and lays out what is shown). Plain ANSI, no
curses: the screen is cleared and written whole, 80 columns, so it works over SSH
and in any terminal; keys are read in cbreak mode: `s` cycles the sort, `q` quits,
Ctrl-C quits cleanly. With --once, or when stdout is not a terminal, it prints one
frame (two scrapes `interval` apart, so rates exist) and exits.
"""
from __future__ import annotations

import contextlib
import select
import sys
import termios
import time
import tty
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from colocate import top_view

CLEAR = "\x1b[H\x1b[2J"
HISTORY = 120                # scrapes kept per endpoint (two minutes at 1 s)


def urls_from_config(path: str | Path) -> list[str]:
    """Each device's endpoint on this host. A device without metrics_port gets a free
    port when served: pass the URL `colocate serve` printed with --url instead."""
    from colocate.config import load_config

    config = load_config(path, check_paths=False, check_env=False)
    missing = [g.entry_name for g in config.gpus if g.metrics_port is None]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} has no metrics_port; pass the URL "
                         "`colocate serve` printed with --url")
    return [f"http://127.0.0.1:{g.metrics_port}/metrics" for g in config.gpus]


def scrape(url: str, timeout: float = 5.0) -> top_view.Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return top_view.parse(text, url, time.monotonic())


class Top:
    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError("no metrics endpoint to watch: give --url or a deployment YAML")
        self.history = {url: deque(maxlen=HISTORY) for url in urls}
        self.sort = "name"
        self.errors: dict[str, str] = {}

    def refresh(self) -> None:
        for url, history in self.history.items():
            try:
                history.append(scrape(url))
                self.errors.pop(url, None)
            except OSError as exc:               # a device restarting or gone: say so
                self.errors[url] = f"{url}: {exc}"

    def frame(self, width: int = 80) -> list[str]:
        device_rows, rows = [], []
        for history in self.history.values():
            if history:
                device_rows += top_view.devices(history[-1])
                rows += top_view.services(list(history))
        lines = top_view.render(device_rows, rows, self.sort, width)
        return lines + [f"unreachable: {e}"[:width] for e in self.errors.values()]

    def next_sort(self) -> None:
        keys = list(top_view.SORT_KEYS)
        self.sort = keys[(keys.index(self.sort) + 1) % len(keys)]


@contextlib.contextmanager
def _cbreak(stream) -> Iterator[None]:
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _key(stream, timeout: float) -> str | None:
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.read(1) if ready else None


def run_top(urls: Sequence[str], interval: float = 1.0, once: bool = False,
            out=None, keys=None) -> int:
    out = out or sys.stdout
    keys = keys or sys.stdin
    top = Top(urls)
    top.refresh()
    if once or not out.isatty():
        time.sleep(interval)
        top.refresh()
        out.write("\n".join(top.frame()) + "\n")
        return 0
    try:
        with _cbreak(keys):
            while True:
                out.write(CLEAR + "\n".join(top.frame()) + "\n")
                out.flush()
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    key = _key(keys, left)
                    if key in ("q", "Q"):
                        return 0
                    if key == "s":
                        top.next_sort()
                        break
                top.refresh()
    except KeyboardInterrupt:
        return 0
    finally:
        out.write("\n")
        out.flush()
