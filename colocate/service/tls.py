"""TLS credentials for a service's gRPC port (and its HTTP port) and for the clients that call it.

Both sides read PEM files at the moment they build credentials, so a certificate
renewed on disk is picked up by the next server start (a service restart) or the
next client. A file that cannot be read is an error naming the file: the deployment
YAML was checked when loaded, but a file can vanish between loading and serving.

With a client CA the server requires every client to present a certificate signed
by it (mutual TLS); the bearer token is still checked on top, so a certificate
proves the machine and the token the tenant.
"""
from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from colocate.config import TLSSpec


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None


def server_credentials(tls: TLSSpec) -> grpc.ServerCredentials:
    """Credentials for the server's port; with tls.client_ca, clients must present a
    certificate that CA signed, or the handshake fails."""
    pair = (_read(tls.key, "key"), _read(tls.cert, "certificate"))
    client_ca = _read(tls.client_ca, "client CA")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def server_ssl_context(tls: TLSSpec) -> ssl.SSLContext:
    """The same files as server_credentials, for the HTTP door (Python's ssl)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for path, what in ((tls.cert, "certificate"), (tls.key, "key")):
        _read(path, what)                     # a missing file named, as for gRPC
    context.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=_read(tls.client_ca, "client CA").decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def channel_credentials(ca: str | None = None, cert: str | None = None,
                        key: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials: `ca` verifies the server (None: the system's roots);
    `cert` and `key`, given together, are the client's certificate for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"))
