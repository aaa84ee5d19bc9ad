"""Deployment files for cluster tests: CPU entries pinned to zones, one service
replicated across them."""
from __future__ import annotations

from pathlib import Path

from colocate.config import DeploymentConfig, load_config
from tests.deployment.helpers import free_ports, token_of

KV_TOKENS = 256
SERVICE = "chat"


CHAT = f"""&chat {{name: {SERVICE}, model: m, max_model_len: 256,
          kv_cache: {{tokens: {KV_TOKENS}}}, max_num_seqs: 8, max_num_batched_tokens: 128,
          tenants: [{{name: tenant, token_env: CHAT_TOKEN}}], port: """


def entry(name: str, zone: str | None, port: int, *, device: str = "cpu",
          restart: str = "never", first: bool = False) -> str:
    """One device entry holding a replica of SERVICE. The first entry spells the
    service out under a YAML anchor; the others reuse it with their own port."""
    pin = f"\n    node: zone={zone}" if zone else ""
    service = f"{CHAT}{port}}}" if first else f"{{<<: *chat, port: {port}}}"
    return f"""
  - device: {device}
    name: {name}{pin}
    restart: {restart}
    memory: 16GiB        # fixed, so admission does not depend on the test machine
    headroom: 0
    services:
      - {service}"""


def replicated_deployment(tmp_path: Path, model_path: str, entries: list[str], *,
                          name: str) -> DeploymentConfig:
    """Write and load a deployment whose entries each hold a replica of SERVICE;
    its tenant's token is token_of(SERVICE)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
models:
  m: {{path: "{model_path}", dtype: float32}}
gpus:{"".join(entries)}
""")
    return load_config(path, {"CHAT_TOKEN": token_of(SERVICE)})


__all__ = ["entry", "free_ports", "replicated_deployment", "token_of", "SERVICE", "KV_TOKENS"]
