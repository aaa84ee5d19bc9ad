"""Tenant authentication: "authorization: Bearer <token>" metadata -> tenant name.

A presented token is hashed (SHA-256) and the digest compared with
hmac.compare_digest against the digest of every known token, with no early exit:
the time taken says nothing about which token matched, how much of one, or (the
digests all being 32 bytes) how long the real tokens are. Refusals never repeat
the token back, and the log records only the method and the kind of failure.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping

import grpc

log = logging.getLogger(__name__)

_SCHEME = "bearer "


class Authenticator:
    def __init__(self, tenants: Mapping[str, str]) -> None:
        """tenants: token -> tenant name. An empty mapping refuses everyone."""
        for token, name in tenants.items():
            if not isinstance(token, str) or not token.strip():
                raise ValueError("tenant tokens must be non-empty strings")
            if not isinstance(name, str) or not name:
                raise ValueError("tenant names must be non-empty strings")
        self._tenants = [(_digest(token.encode()), name) for token, name in tenants.items()]

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The tenant whose token the call carries, or None."""
        token = _bearer_token(metadata)
        if token is None:
            return None
        presented = _digest(token)
        found = None
        for known, name in self._tenants:     # all of them, even after a match
            if hmac.compare_digest(known, presented) and found is None:
                found = name
        return found


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _bearer_token(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value[:len(_SCHEME)].lower() == _SCHEME:
            return value[len(_SCHEME):].strip().encode()
        return None
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without a known tenant's token with UNAUTHENTICATED,
    before any handler runs, except calls to the services named in
    `open_services` (full names, e.g. "grpc.health.v1.Health"): probes from an
    orchestrator must work without holding a tenant's secret."""

    def __init__(self, authenticator: Authenticator, open_services: Iterable[str] = (),
                 on_reject: Callable[[str], None] | None = None) -> None:
        """on_reject("auth") is called for every refused call (for the metrics)."""
        self._auth = authenticator
        self._open = frozenset(open_services)
        self._on_reject = on_reject

    def intercept_service(self, continuation: Callable, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:         # unknown method: let gRPC answer UNIMPLEMENTED
            return None
        # handler_call_details.method is "/package.Service/Method".
        if handler_call_details.method.split("/")[1] in self._open:
            return handler
        if self._auth.tenant_of(handler_call_details.invocation_metadata) is not None:
            return handler
        has_header = any(k.lower() == "authorization"
                         for k, _ in handler_call_details.invocation_metadata or ())
        message = "invalid bearer token" if has_header else "missing bearer token"
        log.info("refused %s: %s", handler_call_details.method, message)
        if self._on_reject is not None:
            self._on_reject("auth")
        return _refusal(handler, message)


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts; gRPC needs
    the shape to match the method's (unary or streaming on each side)."""

    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
