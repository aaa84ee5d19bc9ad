"""`colocate serve --demo`, what `make run` does: the built-in default deployment (three
SmolLM2-135M-Instruct services sharing one copy) starts, each service answers its demo
chat question in English, and SIGTERM stops it. The default YAML is copied with free
ports (so a `make run` elsewhere on this machine cannot collide) and tokens in the
environment; the copy is otherwise the file `colocate serve` uses with no config."""
from __future__ import annotations

import ast
import os
import re
import signal
import subprocess

import pytest
import yaml

from colocate.cluster import deploy
from tests.deployment.helpers import colocate_command, free_ports, wait_for_line

pytestmark = pytest.mark.slow

# What each service is asked (deploy.DEMO_QUESTIONS, in turn) and a word its answer holds.
EXPECTED = {"chat-a": "Paris", "chat-b": "red", "chat-c": "8"}


def test_serve_demo_answers_in_english(tmp_path):
    raw = yaml.safe_load(deploy.default_config_path().read_text())
    ports = free_ports(4)
    raw["gpus"][0]["metrics_port"] = ports[3]
    for service, port in zip(raw["gpus"][0]["services"], ports):
        service["port"] = port
    config = tmp_path / "default.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({f"TENANT_{x}_TOKEN": f"demo-token-{x}" for x in "ABC"})
    proc = subprocess.Popen([*colocate_command(), "serve", str(config), "--demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = wait_for_line(proc, "serving; Ctrl-C to stop", 420)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    out = "".join(lines)
    # "  chat-a: 'question' -> 'answer'", both printed with repr()
    answers = {name: ast.literal_eval(answer)
               for name, answer in re.findall(r"^  (chat-[abc]): '.*' -> (.*)$", out, re.M)}
    assert sorted(answers) == sorted(EXPECTED), out
    # Off a terminal the start shows one line per stage: 30 layers x 9 + 2 GGUF tensors.
    assert re.search(r"^cpu: smollm2 loading: 272 tensors, [\d.]+ MiB in ", out, re.M), out
    assert re.search(r"^cpu: starting services: 3 services in ", out, re.M), out
    for service, word in EXPECTED.items():
        answer = answers[service]
        assert word.lower() in answer.lower(), (service, answer)
        words = re.findall(r"[A-Za-z]+", answer)
        assert len(words) >= 3 and answer.isascii(), (service, answer)
    assert rc == 0
