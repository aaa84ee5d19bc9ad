"""The security settings of the deployment YAML: tls (per device or per service),
max_request_bytes and max_concurrent_rpcs, validated like every other key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from colocate.config import (DEFAULT_MAX_REQUEST_BYTES, EXTRA_CONCURRENT_RPCS, ConfigError,
                             TLSSpec, load_config)

ENV = {"TOK": "secret"}


def service(name: str, port: int, **extra) -> dict:
    return {"name": name, "model": "m", "port": port, "max_model_len": 256,
            "kv_cache": {"tokens": 256}, "max_num_seqs": 8, "max_queued_requests": 32,
            "tenants": [{"name": "t", "token_env": "TOK"}], **extra}


def deployment(device_extra: dict | None = None, *services: dict) -> dict:
    return {"models": {"m": {"path": "preset:tiny"}},
            "gpus": [{"device": "cpu", **(device_extra or {}),
                      "services": list(services) or [service("svc", 50051)]}]}


@pytest.fixture
def pem_dir(tmp_path) -> Path:
    """A deployment folder with placeholder PEM files (the config only checks they
    exist; the TLS tests use real ones)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("server.pem", "server.key", "ca.pem", "other.pem", "other.key"):
        (certs / name).write_text("placeholder")
    return tmp_path


def load(folder: Path, data: dict):
    path = folder / "deploy.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, ENV)


def error_of(folder: Path, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load(folder, data)
    return str(info.value)


SERVER_TLS = {"cert": "certs/server.pem", "key": "certs/server.key"}


def test_device_tls_is_inherited_and_a_service_may_override_it(pem_dir):
    other = {"cert": "certs/other.pem", "key": str(pem_dir / "certs/other.key")}
    cfg = load(pem_dir, deployment({"tls": {**SERVER_TLS, "client_ca": "certs/ca.pem"}},
                                   service("inherits", 50051),
                                   service("own", 50052, tls=other)))
    gpu = cfg.gpus[0]
    inherited, own = gpu.services
    certs = pem_dir / "certs"
    # Relative paths are taken from the YAML's folder, whatever the working directory.
    assert inherited.tls == gpu.tls == TLSSpec(cert=str(certs / "server.pem"),
                                               key=str(certs / "server.key"),
                                               client_ca=str(certs / "ca.pem"))
    assert own.tls == TLSSpec(cert=str(certs / "other.pem"), key=str(certs / "other.key"))


def test_without_tls_a_service_is_plaintext(pem_dir):
    cfg = load(pem_dir, deployment())
    assert cfg.gpus[0].tls is None and cfg.gpus[0].services[0].tls is None


@pytest.mark.parametrize("where", ["device", "service"])
@pytest.mark.parametrize("field", ["cert", "key", "client_ca"])
def test_a_missing_file_names_its_key(pem_dir, where, field):
    tls = {**SERVER_TLS, "client_ca": "certs/ca.pem", field: "certs/absent.pem"}
    if where == "device":
        data, key = deployment({"tls": tls}), f"gpus[0].tls.{field}"
    else:
        data, key = deployment(None, service("svc", 50051, tls=tls)), \
            f"gpus[0].services[0].tls.{field}"
    message = error_of(pem_dir, data)
    assert f"{key}: file " in message and "absent.pem does not exist" in message
    assert "deploy.yaml" in message


@pytest.mark.parametrize("tls,problem", [
    ({"cert": "certs/server.pem"}, "tls.key: missing required key"),
    ({**SERVER_TLS, "ca": "certs/ca.pem"},
     "tls.ca: unknown key; expected one of cert, key, client_ca"),
    ({**SERVER_TLS, "cert": ""}, "tls.cert: expected a non-empty string"),
    ("on", "tls: expected a mapping"),
])
def test_a_malformed_tls_entry_is_refused(pem_dir, tls, problem):
    message = error_of(pem_dir, deployment(None, service("svc", 50051, tls=tls)))
    assert f"gpus[0].services[0].{problem}" in message


def test_limits_default(pem_dir):
    spec = load(pem_dir, deployment()).gpus[0].services[0]
    assert spec.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 4 * 1024 * 1024
    assert spec.max_concurrent_rpcs is None
    # Every request the engine can run (8) or queue (32), and room for the rest.
    assert spec.rpc_limit == 8 + 32 + EXTRA_CONCURRENT_RPCS


def test_limits_are_read(pem_dir):
    spec = load(pem_dir, deployment(None, service("svc", 50051, max_request_bytes="64KiB",
                                                  max_concurrent_rpcs=5))).gpus[0].services[0]
    assert spec.max_request_bytes == 64 * 1024
    assert spec.max_concurrent_rpcs == spec.rpc_limit == 5


@pytest.mark.parametrize("extra,problem", [
    ({"max_request_bytes": 0}, "max_request_bytes: size must be greater than zero"),
    ({"max_request_bytes": "3GiB"}, "max_request_bytes: 3221225472 bytes is too large"),
    ({"max_request_bytes": "lots"}, "max_request_bytes: bad size"),
    ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs: 0 is out of range"),
    ({"max_concurrent_rpcs": "8"}, "max_concurrent_rpcs: expected an integer"),
])
def test_bad_limits_are_refused(pem_dir, extra, problem):
    message = error_of(pem_dir, deployment(None, service("svc", 50051, **extra)))
    assert f"gpus[0].services[0].{problem}" in message
