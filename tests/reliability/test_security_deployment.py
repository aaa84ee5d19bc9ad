"""The security settings from a deployment YAML through the real supervisor, Ray
and gRPC: a service deployed with mutual TLS and a small request limit.
(ray_session comes from this folder's conftest.py.)"""
from __future__ import annotations

import grpc
import pytest

from colocate.client import Client
from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import cpu_deployment
from tests.reliability.security_certs import pki  # noqa: F401  (fixture)
from tests.service.helpers import rpc_error

pytestmark = pytest.mark.slow

TOKEN = "token-of-the-secure-service"


@pytest.fixture(scope="module")
def target(ray_session, tiny_model_dir, pki):
    folder = pki.ca.parent            # relative paths: the YAML sits beside the PEMs
    config = cpu_deployment(
        folder, str(tiny_model_dir), ["secure"], max_model_len=128, max_num_seqs=4,
        device_extra={"tls": {"cert": "server.pem", "key": "server.key", "client_ca": "ca.pem"}},
        per_service={"secure": {"max_request_bytes": "32KiB", "max_concurrent_rpcs": 8}},
        tokens={"secure": TOKEN}, file_name="secure.yaml")
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
