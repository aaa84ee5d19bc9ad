"""Tenant tokens over real gRPC: every Generation rpc (the streaming one too) refuses
a call without a token, with a wrong one, or with a tenant's token of ANOTHER
service; the token never reaches a log; the comparison looks at every token."""
from __future__ import annotations

import logging

import grpc
import pytest

from colocate.client import Client
from colocate.service import auth
from colocate.service.auth import Authenticator
from tests.reliability.security_fixtures import engine_with_tokenizer
from tests.reliability.security_fixtures import start_server  # noqa: F401  (fixture)
from tests.service.helpers import rpc_error

# Every Generation rpc, called through the client; Tokenize both ways.
CALLS = {
    "Generate": lambda c: list(c.generate([1, 2], max_tokens=2)),
    "Complete": lambda c: c.complete([1, 2], max_tokens=2),
    "Tokenize": lambda c: c.tokenize("hello"),
    "Detokenize": lambda c: c.detokenize([1, 2]),
    "GetModelInfo": lambda c: c.model_info(),
    "GetStats": lambda c: c.stats(),
}
OURS = "ours-5f0c2a9d41b7"
THEIRS = "theirs-8e13d6b0c55a"          # a valid tenant token, of the other service
BAD_TOKENS = {"none": None, "wrong": "wrong-3b9e71f0", "other service": THEIRS,
              "ours with a suffix": OURS + "x", "a prefix of ours": OURS[:-1]}


@pytest.fixture
def two_services(start_server, tiny_model_dir):
    """Two services on one host, each with its own tenant (and a tokenizer, so that
    every rpc has a successful counterpart)."""
    ours = start_server(engine_with_tokenizer(tiny_model_dir), tenants={OURS: "team-ours"},
                        name="ours")
    theirs = start_server(engine_with_tokenizer(tiny_model_dir),
                          tenants={THEIRS: "team-theirs"}, name="theirs")
    return ours, theirs


@pytest.mark.parametrize("bad", sorted(BAD_TOKENS))
@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_rpc_refuses_a_bad_token(two_services, method, bad):
    ours, theirs = two_services
    token = BAD_TOKENS[bad]
    with Client(ours.target, token, timeout=10) as client:
        err = rpc_error(lambda: CALLS[method](client))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not ours.llm_engine.has_unfinished_requests()
    # The token is good where it belongs, and ours is good here.
    if bad == "other service":
        with Client(theirs.target, THEIRS, timeout=10) as client:
            CALLS[method](client)
    with Client(ours.target, OURS, timeout=10) as client:
        CALLS[method](client)


def test_a_refused_token_never_reaches_the_logs(two_services, caplog, capfd):
    ours, _ = two_services
    caplog.set_level(logging.DEBUG)            # every logger, at its most talkative
    secrets = [THEIRS, "wrong-3b9e71f0", OURS + "x"]
    for token in secrets:
        with Client(ours.target, token, timeout=10) as client:
            for call in CALLS.values():
                assert rpc_error(lambda: call(client)).code() == \
                    grpc.StatusCode.UNAUTHENTICATED
    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    assert "refused /colocate.v1.Generation/Generate" in caplog.text    # it did log
    for token in secrets:
        assert token not in logged


class CountingCompare:
    """Stands in for hmac.compare_digest, recording each comparison."""

    def __init__(self, real):
        self.real = real
        self.lengths: list[tuple[int, int]] = []

    def __call__(self, a, b):
        self.lengths.append((len(a), len(b)))
        return self.real(a, b)


TENANTS = {f"token-{i}-" + "k" * i: f"tenant-{i}" for i in range(6)}


@pytest.mark.parametrize("presented", [*TENANTS, "nobody", "", "token-0-", "x" * 500])
def test_the_comparison_visits_every_token_with_equal_lengths(monkeypatch, presented):
    counter = CountingCompare(auth.hmac.compare_digest)
    monkeypatch.setattr(auth.hmac, "compare_digest", counter)
    found = Authenticator(TENANTS).tenant_of([("authorization", f"Bearer {presented}")])
    assert found == TENANTS.get(presented)
    # No early exit at a match, and every comparison is of two same-size digests,
    # so neither the position of the match nor the tokens' lengths show in the time.
    assert len(counter.lengths) == len(TENANTS)
    assert set(counter.lengths) == {(32, 32)}


def test_tokens_are_kept_only_as_digests():
    authenticator = Authenticator(TENANTS)
    held = repr(vars(authenticator))
    assert not any(token in held for token in TENANTS)
