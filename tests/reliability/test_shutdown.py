"""Graceful shutdown of `colocate serve CONFIG`, as an operator's SIGTERM does it.

In order: the health service says NOT_SERVING (and /metrics says draining), new
requests get UNAVAILABLE, the request in flight runs to its last token, the process exits 0, and nothing is left
behind: no process it started (Ray's included), no /dev/shm/colocate-weights-*
directory, no entry in the device's shared ledger.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import grpc
import psutil
import pytest

from colocate import top_view
from colocate.client import Client
from colocate.memory.shared_ledger import FILE_PREFIX, default_dir
from colocate.memory.weight_store import DIR_PREFIX, default_root
from colocate.top import scrape
from tests.deployment.helpers import colocate_command, token_of, wait_for_line
from tests.reliability.reliability_helpers import record, reliability_deployment

pytestmark = pytest.mark.slow

IN_FLIGHT_TOKENS = 900


def test_sigterm_drains_then_leaves_nothing_behind(tiny_model_dir, tmp_path):
    config = reliability_deployment(
        tmp_path, str(tiny_model_dir),
        {"svc-s": dict(kv_tokens=1024, max_model_len=1024, max_queued_requests=4)})
    (service,) = [s for _, s in config.services()]
    target = f"127.0.0.1:{service.port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TOKEN_0"] = token_of("svc-s")
    # A grace far longer than the 900 tokens take, so the in-flight request finishes
    # inside it however loaded the machine is (at 10 s, the default, a busy 2-core
    # box sometimes cut it off: a timing dependency, not a drain fault).
    proc = subprocess.Popen([*colocate_command(), "serve", str(tmp_path / "reliability.yaml"),
                             "--grace", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        lines = wait_for_line(proc, "serving; Ctrl-C to stop", 180)
        (metrics_url,) = re.findall(r"^  cpu  (http://\S+/metrics)$", "".join(lines), re.M)
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]

        health: list[tuple[float, str]] = []
        watch_client = Client(target, None)
        watch = watch_client.watch_health(timeout=120)

        def watch_it():
            try:
                for status in watch:
                    health.append((time.monotonic(), status))
            except grpc.RpcError:
                pass                              # the server went away: expected
        threading.Thread(target=watch_it, daemon=True).start()

        in_flight, finished = [], {}
        started = threading.Event()

        def long_request():
            with Client(target, token_of("svc-s"), timeout=120) as client:
                for delta in client.generate([1, 2, 3], max_tokens=IN_FLIGHT_TOKENS,
                                             ignore_eos=True, temperature=0.0):
                    in_flight.extend(delta.token_ids)
                    started.set()
                    if delta.finished:
                        finished.update(reason=delta.finish_reason, at=time.monotonic())
        runner = threading.Thread(target=long_request)
        runner.start()
        assert started.wait(30)

        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not any(s == "NOT_SERVING" for _, s in health):
            assert time.monotonic() < deadline, f"health never said NOT_SERVING: {health}"
            time.sleep(0.01)
        not_serving_at = next(t for t, s in health if s == "NOT_SERVING")
        # While the request in flight drains, /metrics is still up and says so.
        state_while_draining = top_view.state_of(scrape(metrics_url), "svc-s")
        with Client(target, token_of("svc-s"), timeout=10) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.complete([1, 2], max_tokens=2)
        runner.join(60)
        rc = proc.wait(120)
        exited_at = time.monotonic()
        watch_client.close()

        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert state_while_draining == "draining"
        assert finished.get("reason") == "length" and len(in_flight) == IN_FLIGHT_TOKENS
        assert sent_at < not_serving_at < finished["at"] < exited_at
        assert rc == 0

        leftovers = _wait_gone(family, 30)
        weights = [d for pid in family for d in default_root().glob(f"{DIR_PREFIX}{pid}-*")]
        ledger = _ledger_pids(family)
        record(tmp_path, "sigterm", dict(
            not_serving_after_s=round(not_serving_at - sent_at, 3),
            in_flight_done_after_s=round(finished["at"] - sent_at, 3),
            exited_after_s=round(exited_at - sent_at, 3), processes_started=len(family)))
        assert not leftovers, f"still running: {leftovers}"
        assert not weights and not ledger
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _wait_gone(pids: list[int], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(p.cmdline())[:80]}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _ledger_pids(pids: list[int]) -> list[int]:
    held = []
    for path in default_dir().glob(f"{FILE_PREFIX}*.json"):
        try:
            entries = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            continue
        held += [e["pid"] for e in entries.values() if e["pid"] in pids]
    return held
