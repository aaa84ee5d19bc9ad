"""Deployment YAML for tests: N services of one model on the CPU, on free ports."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
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
