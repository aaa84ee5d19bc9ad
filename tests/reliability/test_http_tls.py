"""The HTTP door with the service's TLS files: HTTPS only; with a client CA, only
clients holding a certificate it signed get through the handshake, and the bearer
token is still required on top."""
from __future__ import annotations

import http.client
import json
import ssl

import pytest

from colocate.config import TLSSpec
from tests.reliability.security_certs import pki  # noqa: F401  (fixture)
from tests.reliability.security_fixtures import TOKEN, start_server  # noqa: F401  (fixture)


def context(pki, cert=None, key=None) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def models(service, ctx: ssl.SSLContext | None, token: str = TOKEN) -> int:
    conn = (http.client.HTTPSConnection(service.http.host, service.http.port, context=ctx,
                                        timeout=10) if ctx is not None else
            http.client.HTTPConnection(service.http.host, service.http.port, timeout=10))
    try:
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        json.loads(response.read())
        return response.status
    finally:
        conn.close()


def test_https_only(start_server, pki):  # noqa: F811
    tls = TLSSpec(cert=str(pki.server_cert), key=str(pki.server_key))
    service = start_server(http=dict(names=["fake"], tls=tls))
    assert service.http.url.startswith("https://")
    assert models(service, context(pki)) == 200
    assert models(service, context(pki), token="wrong") == 401
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        models(service, None)                     # plaintext to a TLS port


def test_mutual_tls_admits_only_the_ca_clients(start_server, pki):  # noqa: F811
    tls = TLSSpec(cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.ca))
    service = start_server(http=dict(names=["fake"], tls=tls))
    assert models(service, context(pki, pki.client_cert, pki.client_key)) == 200
    assert models(service, context(pki, pki.client_cert, pki.client_key), "wrong") == 401
    for cert, key in ((None, None), (pki.stranger_cert, pki.stranger_key)):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            models(service, context(pki, cert, key))


def test_a_missing_file_is_named(start_server, pki, tmp_path):  # noqa: F811
    tls = TLSSpec(cert=str(tmp_path / "gone.pem"), key=str(pki.server_key))
    with pytest.raises(ValueError, match="gone.pem"):
        start_server(http=dict(names=["fake"], tls=tls))
