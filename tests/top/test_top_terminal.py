"""`colocate top` in a pseudo-terminal against a served deployment: it shows every
service, its request counts follow the requests sent, `s` re-sorts, `q` quits
cleanly; and one plain frame when stdout is not a terminal."""
from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

from tests.deployment.helpers import stream_tokens, token_of
from tests.top.conftest import NAMES

pytestmark = pytest.mark.slow
COMMAND = [sys.executable, "-c", "import sys; from colocate.cli import main; sys.exit(main())"]


class Screen:
    """Reads a program's pseudo-terminal; `last_frame` is the text after the last clear."""

    def __init__(self, master: int) -> None:
        self.master, self.text = master, ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.text += os.read(self.master, 65536).decode(errors="replace")
            except OSError:          # the program exited and closed its side
                pass

    def last_frame(self) -> str:
        return self.text.rsplit("\x1b[2J", 1)[-1]

    def wait_for(self, check, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.2)
            frame = self.last_frame()
            if check(frame):
                return frame
        raise AssertionError(f"screen never matched; last frame:\n{self.last_frame()}")


def _done(frame: str, service: str) -> int | None:
    """The DONE column (requests finished) of a service's row."""
    for line in frame.splitlines():
        if line.startswith(service):
            return int(line.split()[-2])
    return None


def test_top_follows_requests_and_quits(deployment):
    url = deployment.metrics_urls()["cpu"]
    master, slave = os.openpty()
    proc = subprocess.Popen([*COMMAND, "top", "--url", url, "--interval", "0.5"],
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    screen = Screen(master)
    try:
        first = screen.wait_for(lambda f: all(_done(f, n) is not None for n in NAMES))
        assert all(len(line) <= 80 for line in first.splitlines())
        assert all(re.search(rf"^{n}\s+serving\s", first, re.M) for n in NAMES), first
        assert "capacity 16.0 GiB" in first
        before = _done(first, "top-a")
        target = {e.service: e.target for e in deployment.endpoints()}["top-a"]
        for i in range(3):
            assert len(stream_tokens(target, token_of("top-a"), [1, 5 + i, 9], max_tokens=4,
                                     ignore_eos=True)) == 4
        after = screen.wait_for(lambda f: _done(f, "top-a") == before + 3)
        assert _done(after, "top-b") == _done(first, "top-b")        # b saw none of it
        os.write(master, b"s")
        assert "sort: running" in screen.wait_for(lambda f: "sort: running" in f)
        os.write(master, b"q")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_top_prints_one_frame_when_not_a_terminal(deployment):
    url = deployment.metrics_urls()["cpu"]
    out = subprocess.run([*COMMAND, "top", "--url", url, "--interval", "0.2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout
    assert all(re.search(rf"^{n}\s", out.stdout, re.M) for n in NAMES), out.stdout


def test_top_without_an_endpoint_says_so():
    out = subprocess.run([*COMMAND, "top"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no metrics endpoint" in out.stderr


def test_top_address_watches_every_device_on_the_cluster(deployment):
    """--address joins the Ray cluster and finds each deployment's devices there."""
    import ray

    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([*COMMAND, "top", "--address", address, "--once"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(re.search(rf"^{n}\s+serving\s", out.stdout, re.M) for n in NAMES), out.stdout
