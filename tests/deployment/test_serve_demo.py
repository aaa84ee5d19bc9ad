"""`colocate serve --demo`, what `make run` does: the built-in default deployment (three
SmolLM2-135M-Instruct services sharing one copy) starts, each service answers its demo
chat question in English, and SIGTERM stops it. The default YAML is copied with free
ports (so a `make run` elsewhere on this machine cannot collide) and tokens in the
environment; the copy is otherwise the file `colocate serve` uses with no config. The
README's curl example is asked of chat-a's OpenAI-compatible HTTP port."""
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
EXPECTED = {"chat-a": "Tokyo", "chat-b": "red", "chat-c": "7"}


def test_serve_demo_answers_in_english(tmp_path):
    raw = yaml.safe_load(deploy.default_config_path().read_text())
    ports = free_ports(7)
    raw["gpus"][0]["metrics_port"] = ports[3]
    for service, port, http_port in zip(raw["gpus"][0]["services"], ports, ports[4:]):
        service["port"], service["http_port"] = port, http_port
    config = tmp_path / "default.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({f"TENANT_{x}_TOKEN": f"demo-token-{x}" for x in "ABC"})
    proc = subprocess.Popen([*colocate_command(), "serve", str(config), "--demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = wait_for_line(proc, "serving; Ctrl-C to stop", 420)
        # The README's curl example, against chat-a's OpenAI-compatible port.
        reply = _http_chat(ports[4], "demo-token-A", "What is the capital of Japan?")
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
    assert "Tokyo" in reply["choices"][0]["message"]["content"], reply
    assert reply["model"] == "smollm2" and reply["usage"]["completion_tokens"] > 0
    assert f"http://127.0.0.1:{ports[4]}/v1" in out        # printed with the endpoints


def _http_chat(port: int, token: str, question: str) -> dict:
    import json
    import urllib.request

    body = {"model": "smollm2", "messages": [{"role": "user", "content": question}],
            "max_tokens": 32, "temperature": 0}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)
