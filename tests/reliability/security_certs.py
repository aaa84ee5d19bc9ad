"""A throwaway PKI for the TLS tests, made with the openssl command line: a CA, a
server certificate for 127.0.0.1 / localhost, a client certificate from the same
CA, and a CA of strangers with its own client certificate.

EC P-256 keys: quick to make, and what a real deployment would likely use.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path              # a CA the server does not trust
    stranger_cert: Path            # a client certificate signed by stranger_ca
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(dir: Path, name: str) -> None:
    _openssl("req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)


def _make_leaf(dir: Path, name: str, ca: str, extensions: str) -> None:
    (dir / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=dir)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(secrets.randbelow(2**63) + 1), "-days", "2",
             "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=dir)


def make_pki(dir: Path) -> Pki:
    client = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n"
    _make_ca(dir, "ca")
    _make_ca(dir, "stranger-ca")
    _make_leaf(dir, "server", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                     "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_leaf(dir, "client", "ca", client)
    _make_leaf(dir, "stranger", "stranger-ca", client)
    return Pki(ca=dir / "ca.pem", server_cert=dir / "server.pem", server_key=dir / "server.key",
               client_cert=dir / "client.pem", client_key=dir / "client.key",
               stranger_ca=dir / "stranger-ca.pem", stranger_cert=dir / "stranger.pem",
               stranger_key=dir / "stranger.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    # Not a skip: without openssl the TLS tests would show nothing.
    assert shutil.which("openssl"), "the openssl command makes the test certificates: install it"
    return make_pki(tmp_path_factory.mktemp("pki"))
