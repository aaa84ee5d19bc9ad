"""`colocate serve` on SIGHUP applies its YAML again, live; `colocate apply` refuses a
bad file before it joins any cluster."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import yaml

from colocate.cluster.apply import run_apply
from tests.deployment.helpers import (colocate_command, cpu_deployment, free_ports,
                                      stream_tokens, token_of, wait_for_line)


def wait_for(lines: list[str], text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in lines if text in line]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} in:\n{''.join(lines)}")


def test_sighup_adds_a_service_and_keeps_the_other(tmp_path, tiny_model_dir):
    config = cpu_deployment(tmp_path, str(tiny_model_dir), ["first"])
    path = tmp_path / "deployment.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TOKEN_0=token_of("first"), TOKEN_1=token_of("second"))
    proc = subprocess.Popen([*colocate_command(), "serve", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = wait_for_line(proc, "serving; Ctrl-C to stop", 180)
        first = f"127.0.0.1:{config.gpus[0].services[0].port}"
        answer = stream_tokens(first, token_of("first"), [1, 2, 3], max_tokens=8,
                               temperature=0.0)
        doc = yaml.safe_load(path.read_text())
        (port,) = free_ports(1)
        doc["gpus"][0]["services"].append(
            {**doc["gpus"][0]["services"][0], "name": "second", "port": port,
             "tenants": [{"name": "tenant-second", "token_env": "TOKEN_1"}]})
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lines, "reloaded", 180).strip().endswith("cpu: add second")
        second = f"127.0.0.1:{port}"
        assert stream_tokens(second, token_of("second"), [1, 2, 3], max_tokens=8,
                             temperature=0.0) == answer
        assert stream_tokens(first, token_of("first"), [1, 2, 3], max_tokens=8,
                             temperature=0.0) == answer
        # A file that no longer loads is refused; the deployment serves on.
        path.write_text("gpus: []\n")
        proc.send_signal(signal.SIGHUP)
        assert "nothing changed" in wait_for(lines, "refused", 60)
        assert stream_tokens(second, token_of("second"), [1, 2, 3], max_tokens=8,
                             temperature=0.0) == answer
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def test_apply_refuses_a_bad_file_before_joining(tmp_path, capsys):
    path = tmp_path / "new.yaml"
    path.write_text("models: {}\ngpus: nope\n")
    assert run_apply(str(path), "127.0.0.1:1") == 2
    err = capsys.readouterr().err
    assert err.startswith("colocate apply: ") and str(path) in err
