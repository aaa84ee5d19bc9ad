"""TLS and mutual TLS on a service's port, over real gRPC with certificates made for
the test: who gets through the handshake, and that the token is still required."""
from __future__ import annotations

import grpc
import pytest

from colocate.client import Client
from colocate.config import TLSSpec
from colocate.service.tls import channel_credentials, server_credentials
from tests.reliability.security_certs import pki  # noqa: F401  (fixture)
from tests.reliability.security_fixtures import TOKEN, start_server  # noqa: F401  (fixture)
from tests.service.helpers import rpc_error


def server_tls(pki, mutual: bool) -> TLSSpec:
    return TLSSpec(cert=str(pki.server_cert), key=str(pki.server_key),
                   client_ca=str(pki.ca) if mutual else None)


# How each kind of client dials: Client keyword arguments, from the test PKI.
CLIENTS = {
    "plaintext": lambda p: {},
    "tls": lambda p: dict(tls_ca=str(p.ca)),
    "mtls": lambda p: dict(tls_ca=str(p.ca), tls_cert=str(p.client_cert),
                           tls_key=str(p.client_key)),
    "stranger-cert": lambda p: dict(tls_ca=str(p.ca), tls_cert=str(p.stranger_cert),
                                    tls_key=str(p.stranger_key)),
    "distrusts-server": lambda p: dict(tls_ca=str(p.stranger_ca)),
}

# (server requires client certificates, client kind) -> does the call get through
ADMITTED = {
    (False, "plaintext"): False, (False, "tls"): True, (False, "mtls"): True,
    (False, "distrusts-server"): False,
    (True, "plaintext"): False, (True, "tls"): False, (True, "mtls"): True,
    (True, "stranger-cert"): False, (True, "distrusts-server"): False,
}


@pytest.mark.parametrize("mutual,kind", sorted(ADMITTED))
def test_handshake_admits_exactly_the_right_clients(start_server, pki, mutual, kind):
    served = start_server(tls=server_tls(pki, mutual))
    with Client(served.target, TOKEN, timeout=10, **CLIENTS[kind](pki)) as client:
        if ADMITTED[mutual, kind]:
            assert client.model_info().service_name == "secure"
            assert client.health() == "SERVING"
            return
        # Refused in the handshake, before any method runs: health too.
        for call in (client.model_info, client.health):
            assert rpc_error(call).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_streams_a_generation(start_server, pki):
    served = start_server(tls=server_tls(pki, mutual=True))
    with Client(served.target, TOKEN, timeout=10, **CLIENTS["mtls"](pki)) as client:
        deltas = list(client.generate([5, 6, 7], max_tokens=5))
    assert sum(len(d.token_ids) for d in deltas) == 5 and deltas[-1].finish_reason == "length"


def test_a_client_certificate_does_not_replace_the_token(start_server, pki):
    served = start_server(tls=server_tls(pki, mutual=True))
    for token in (None, "not-a-tenant"):
        with Client(served.target, token, timeout=10, **CLIENTS["mtls"](pki)) as client:
            for call in (client.model_info, lambda: list(client.generate([1, 2]))):
                assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_plaintext_server_refuses_a_tls_client(start_server, pki):
    served = start_server()
    with Client(served.target, TOKEN, timeout=10, **CLIENTS["tls"](pki)) as client:
        assert rpc_error(client.model_info).code() == grpc.StatusCode.UNAVAILABLE


def test_unreadable_files_are_named(tmp_path, pki):
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ValueError, match="nope.pem"):
        server_credentials(TLSSpec(cert=missing, key=str(pki.server_key)))
    with pytest.raises(ValueError, match="nope.pem"):
        channel_credentials(ca=missing)
    with pytest.raises(ValueError, match="certificate needs its key"):
        channel_credentials(ca=str(pki.ca), cert=str(pki.client_cert))


def test_serve_fails_before_starting_when_a_file_is_missing(tmp_path, pki):
    from colocate.service.grpc_server import serve

    class NeverStarted:
        def start(self):
            raise AssertionError("the engine was started although the key is missing")

    with pytest.raises(ValueError, match="gone.key"):
        serve(NeverStarted(), 0, {"t": "a"}, "svc",
              tls=TLSSpec(cert=str(pki.server_cert), key=str(tmp_path / "gone.key")))


def test_cli_generate_speaks_mutual_tls(start_server, pki, tiny_model_dir, capsys):
    from colocate.cli import main
    from tests.reliability.security_fixtures import engine_with_tokenizer

    served = start_server(engine_with_tokenizer(tiny_model_dir), tls=server_tls(pki, True))
    with Client(served.target, TOKEN, timeout=10, **CLIENTS["mtls"](pki)) as client:
        expected = client.generate_text("Hello", max_tokens=6, temperature=0.0)
    base = ["generate", "--target", served.target, "--token", TOKEN, "--max-tokens", "6",
            "--temperature", "0", "Hello"]
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]
    assert main(base + tls) == 0
    assert capsys.readouterr().out == expected + "\n"
    # Without its certificate the handshake fails: a status, not a traceback.
    assert main(base + tls[:2]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")
    assert main(base + ["--tls-ca", str(pki.ca) + ".missing"]) == 2
    assert ".missing" in capsys.readouterr().err
