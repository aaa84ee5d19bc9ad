"""Deployment YAML for tests: N services of one model on the CPU, on free ports."""
from __future__ import annotations

import socket
from pathlib import Path

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
                   quantization: str | None = None, kv_dtype: str = "auto") -> DeploymentConfig:
    """Write and load a one-device deployment; service X's tenant uses token_of(X)."""
    services = "".join(f"""
      - name: {name}
        model: m
        port: {port}
        max_model_len: {max_model_len}
        kv_cache: {{dtype: {kv_dtype}, tokens: {kv_tokens}}}
        max_num_seqs: {max_num_seqs}
        max_num_batched_tokens: 128
        tenants: [{{name: tenant-{name}, token_env: TOKEN_{i}}}]""" for i, (name, port)
                       in enumerate(zip(names, free_ports(len(names)))))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "deployment.yaml"
    path.write_text(f"""
models:
  m: {{path: "{model_path}", dtype: float32, quantization: {quantization or "null"}}}
gpus:
  - device: cpu
    memory: 16GiB        # fixed, so admission does not depend on the test machine
    headroom: 0
    share_weights: {str(share_weights).lower()}
    services:{services}
""")
    env = {f"TOKEN_{i}": token_of(name) for i, name in enumerate(names)}
    return load_config(path, env)


def stream_tokens(target: str, token: str, prompt, **sampling) -> list[int]:
    from colocate.client import Client

    with Client(target, token, timeout=120) as client:
        return [t for delta in client.generate(prompt, **sampling) for t in delta.token_ids]
