"""The security settings from a deployment YAML through the real supervisor, Ray
and gRPC: a service deployed with mutual TLS and a small request limit.
(ray_session comes from this folder's conftest.py.)"""
from __future__ import annotations

import grpc
import pytest

from colocate.client import Client
from colocate.config import load_config
from colocate.serving.deploy import Deployment
from tests.deployment.helpers import free_ports
from tests.reliability.security_certs import pki  # noqa: F401  (fixture)
from tests.serving.helpers import rpc_error

pytestmark = pytest.mark.slow

TOKEN = "token-of-the-secure-service"


@pytest.fixture(scope="module")
def target(ray_session, tiny_model_dir, pki):
    folder = pki.ca.parent            # relative paths: the YAML sits beside the PEMs
    (port,) = free_ports(1)
    path = folder / "secure.yaml"
    path.write_text(f"""
models:
  m: {{path: "{tiny_model_dir}", dtype: float32}}
gpus:
  - device: cpu
    memory: 16GiB
    headroom: 0
    tls: {{cert: server.pem, key: server.key, client_ca: ca.pem}}
    services:
      - name: secure
        model: m
        port: {port}
        max_model_len: 128
        kv_cache: {{tokens: 256}}
        max_num_seqs: 4
        max_num_batched_tokens: 128
        max_request_bytes: 32KiB
        max_concurrent_rpcs: 8
        tenants: [{{name: team, token_env: SECURE_TOKEN}}]
""")
    config = load_config(path, {"SECURE_TOKEN": TOKEN})
    with Deployment(config, torch_threads=1, health_interval_s=1.0) as dep:
        (endpoint,) = dep.wait_ready(timeout=180)
        yield endpoint.target


def mtls(pki, **kwargs) -> dict:
    return dict(tls_ca=str(pki.ca), tls_cert=str(pki.client_cert),
                tls_key=str(pki.client_key), **kwargs)


def test_the_right_client_generates(target, pki):
    with Client(target, TOKEN, timeout=60, **mtls(pki)) as client:
        result = client.complete("Hello", max_tokens=4, temperature=0.0)
        assert result.finish_reason == "length" and len(result.token_ids) == 4
        assert client.model_info().service_name == "secure"


@pytest.mark.parametrize("kind", ["plaintext", "no client certificate", "stranger"])
def test_other_clients_fail_the_handshake(target, pki, kind):
    options = {"plaintext": {}, "no client certificate": dict(tls_ca=str(pki.ca)),
               "stranger": dict(tls_ca=str(pki.ca), tls_cert=str(pki.stranger_cert),
                                tls_key=str(pki.stranger_key))}[kind]
    with Client(target, TOKEN, timeout=30, **options) as client:
        assert rpc_error(client.model_info).code() == grpc.StatusCode.UNAVAILABLE


def test_the_token_is_still_checked(target, pki):
    with Client(target, "not-the-token", timeout=30, **mtls(pki)) as client:
        assert rpc_error(lambda: list(client.generate("Hi"))).code() == \
            grpc.StatusCode.UNAUTHENTICATED


def test_the_request_limit_from_the_yaml_applies(target, pki):
    with Client(target, TOKEN, timeout=60, **mtls(pki)) as client:
        err = rpc_error(lambda: client.complete("w" * 40_000, max_tokens=2))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.complete("Hello", max_tokens=2).finish_reason == "length"
