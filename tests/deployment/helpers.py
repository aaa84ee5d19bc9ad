"""Deployment YAML for tests: N services of one model on the CPU, on free ports."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from colocate.config import DeploymentConfig, load_config


def free_ports(n: int) -> list[int]:
    """Ports the OS reports free now (bound to 0 together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def token_of(service: str) -> str:
    return f"token-for-{service}"


def cpu_deployment(tmp_path: Path, model_path: str, names: list[str], *,
                   share_weights: bool = True, kv_tokens: int = 256,
                   max_model_len: int = 256, max_num_seqs: int = 8,
                   quantization: str | None = None, kv_dtype: str = "auto",
                   memory: str = "16GiB", per_service: dict[str, dict] | None = None,
                   device_extra: dict | None = None, tokens: dict[str, str] | None = None,
                   file_name: str = "deployment.yaml") -> DeploymentConfig:
    """Write and load a one-device deployment of one model. Service X's tenant uses
    tokens[X], else token_of(X); per_service[X] adds or overrides X's YAML keys and
    device_extra the device's (e.g. `tls`)."""
    per_service, tokens = per_service or {}, tokens or {}
    services = [{
        "name": name, "model": "m", "port": port, "max_model_len": max_model_len,
        "kv_cache": {"dtype": kv_dtype, "tokens": kv_tokens},
        "max_num_seqs": max_num_seqs, "max_num_batched_tokens": 128,
        "tenants": [{"name": f"tenant-{name}", "token_env": f"TOKEN_{i}"}],
        **per_service.get(name, {}),
    } for i, (name, port) in enumerate(zip(names, free_ports(len(names))))]
    device = {"device": "cpu",
              "memory": memory,     # fixed, so admission does not depend on the test machine
              "headroom": 0, "share_weights": share_weights, **(device_extra or {}),
              "services": services}
    doc = {"models": {"m": {"path": str(model_path), "dtype": "float32",
                            "quantization": quantization}},
           "gpus": [device]}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / file_name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = {f"TOKEN_{i}": tokens.get(name, token_of(name)) for i, name in enumerate(names)}
    return load_config(path, env)


def stream_tokens(target: str, token: str, prompt, **sampling) -> list[int]:
    from colocate.client import Client

    with Client(target, token, timeout=120) as client:
        return [t for delta in client.generate(prompt, **sampling) for t in delta.token_ids]


def scrape_by_service(url: str, name: str) -> dict[str, float]:
    """One series of a device's /metrics endpoint, by its `service` label."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {s.labels["service"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def wait_service_pools_empty(deployment, timeout: float = 20.0) -> None:
    """Every running service process of `deployment` (each replica on its own) reports,
    through GetStats, no request running or waiting and no KV block held: the check
    tests/conftest.py makes of the pools in the pytest process, made of the pools in
    service processes. A request aborted at the end of a test frees its blocks within
    an engine step, so this waits a little before failing."""
    import os
    import time

    from colocate.client import Client

    deadline = time.monotonic() + timeout
    for endpoint in deployment.endpoints():
        if endpoint.state != "running":
            continue
        # cpu_deployment passes tokens to load_config, not through the environment.
        token = os.environ.get(endpoint.token_envs[0]) or token_of(endpoint.service)
        with Client(endpoint.target, token) as client:
            while True:
                stats = client.stats()
                held = (stats.num_running, stats.num_waiting, stats.kv_blocks_used)
                if held == (0, 0, 0):
                    break
                assert time.monotonic() < deadline, (
                    f"{endpoint.service} at {endpoint.target} still holds "
                    f"(running, waiting, kv blocks) = {held}")
                time.sleep(0.1)


def colocate_command() -> list[str]:
    script = Path(sys.executable).parent / "colocate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from colocate.cli import main; sys.exit(main())"]


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> list[str]:
    """Lines of the process's output until one holds `text` (read in a thread,
    so a silent process fails the test instead of blocking it)."""
    lines, found = [], threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if text in line:
                found.set()
    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), f"no {text!r} in:\n{''.join(lines)}"
    return lines


def offline_tokens(model_dir, kv_tokens: int, requests: dict) -> dict:
    """What the offline LLM gives each request (key -> (prompt, sampling keywords)),
    one at a time, on one torch thread as the services run (thread count moves float
    sums, and so a near-tie of greedy tokens)."""
    import torch

    from colocate.llm import LLM
    from colocate.sampling_params import SamplingParams

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=str(model_dir), kv_cache_tokens=kv_tokens, max_model_len=256)
        return {key: llm.generate([prompt], SamplingParams(**sampling))[0].token_ids
                for key, (prompt, sampling) in requests.items()}
    finally:
        torch.set_num_threads(threads_before)


def offline_and_concurrent(targets: dict[str, str], requests: dict, model_dir,
                           kv_tokens: int) -> tuple[dict, dict]:
    """(what the offline LLM gives each request, what each service streamed when all
    were called at once). requests: service -> (prompt, sampling keywords)."""
    expected = offline_tokens(model_dir, kv_tokens, requests)
    got, errors = {}, []

    def call(name):
        prompt, sampling = requests[name]
        try:
            got[name] = stream_tokens(targets[name], token_of(name), prompt, **sampling)
        except Exception as exc:       # reported below, not lost in the thread
            errors.append((name, exc))

    workers = [threading.Thread(target=call, args=(n,)) for n in requests]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors, errors
    return expected, got


def service_rows(deployment) -> dict[str, dict]:
    """service name -> its row in the (one-device) deployment's status."""
    (device,) = deployment.status()
    return {s["name"]: s for s in device["services"]}


def stats_while_running(deployment, workers: list[threading.Thread],
                        every_s: float = 0.05) -> list[dict]:
    """Start `workers` and sample every service's stats (service name -> ServiceStats or
    None) until all of them have finished; the samples, oldest first."""
    for w in workers:
        w.start()
    samples = []
    while any(w.is_alive() for w in workers):
        samples.append({n: r["stats"] for n, r in service_rows(deployment).items()})
        time.sleep(every_s)
    for w in workers:
        w.join()
    return samples
