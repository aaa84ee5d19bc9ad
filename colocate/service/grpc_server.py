"""The gRPC face of one service: GenerationServicer over an EngineProtocol, the
standard health service beside it, and serve().

Errors become status codes here and nowhere else: ValueError (SamplingParams or
engine validation, whose messages name the field and the limit) is
INVALID_ARGUMENT (but a Chat to a model without a chat template is
FAILED_PRECONDITION), a full queue RESOURCE_EXHAUSTED, a stopped engine UNAVAILABLE,
anything else INTERNAL with a fixed message; tracebacks go to the log, never to
the client. A call that ends early, because the client cancelled, disconnected
or let its deadline pass, aborts its request: gRPC runs the call's callbacks at
once, and the engine drops the request, freeing its KV blocks, before its next
step.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc

from colocate.config import DEFAULT_MAX_REQUEST_BYTES, TLSSpec
from colocate.engine.engine import PromptTooLongError
from colocate.engine.outputs import RequestOutput
from colocate.model.chat_template import NoChatTemplateError
from colocate.service import messages
from colocate.service.auth import AuthInterceptor, Authenticator
from colocate.service.engine_protocol import EngineDeadError, EngineProtocol, QueueFullError
from colocate.service.health import SERVICE_NAME as HEALTH_SERVICE
from colocate.service.health import HealthServicer
from colocate.service.messages import model_info_from_engine  # noqa: F401  (public here)
from colocate.service.proto_gen import colocate_pb2 as pb
from colocate.service.proto_gen import colocate_pb2_grpc as pb_grpc
from colocate.service.proto_gen import health_pb2_grpc
from colocate.service.tls import server_credentials

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class _Unauthenticated(Exception):
    pass


_STATUS_OF = [
    (NoChatTemplateError, grpc.StatusCode.FAILED_PRECONDITION),    # also a ValueError
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (_Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
]


# A refused call's reason, for the rejection counter (colocate/metrics/rejections.py).
# Most specific first: a too-long prompt is also a ValueError.
_REJECT_REASON_OF = [
    (_Unauthenticated, "auth"),
    (PromptTooLongError, "too_long"),
    (ValueError, "invalid"),
    (QueueFullError, "overloaded"),
]

OnReject = Callable[[str], None]


def rejection_reason(exc: BaseException) -> str | None:
    return next((reason for kind, reason in _REJECT_REASON_OF if isinstance(exc, kind)), None)


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext, method: str,
                     on_reject: OnReject | None = None):
    """Turn an exception from the body into the call's status. The body must not
    call context.abort itself (its exception would be taken for a bug here)."""
    try:
        yield
    except Exception as exc:
        reason = rejection_reason(exc)
        if on_reject is not None and reason is not None:
            on_reject(reason)
        for kind, code in _STATUS_OF:
            if isinstance(exc, kind):
                context.abort(code, str(exc))
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: EngineProtocol, authenticator: Authenticator,
                 model_info: pb.ModelInfo, on_reject: OnReject | None = None) -> None:
        """on_reject(reason) is called when Generate or Complete refuses a request."""
        self._engine = engine
        self._auth = authenticator
        self._model_info = model_info
        self._on_reject = on_reject

    def _tenant(self, context: grpc.ServicerContext) -> str:
        # The interceptor already refused unknown tokens; asking again gives the
        # tenant's name and keeps the servicer safe if mounted without it.
        tenant = self._auth.tenant_of(context.invocation_metadata())
        if tenant is None:
            raise _Unauthenticated("missing or invalid bearer token")
        return tenant

    def _outputs(self, submit: Callable[[str], Iterator[RequestOutput]], request_id: str,
                 context: grpc.ServicerContext) -> Iterator[RequestOutput]:
        """submit(engine request id) queues the request; yield its outputs. Whatever
        ends the call (cancel, disconnect, deadline, server stop) aborts it."""
        tenant = self._tenant(context)
        # Namespaced by tenant: two tenants may pick the same request_id.
        stream = submit(f"{tenant}/{request_id}")
        # gRPC runs the callback when the call ends for any reason, even while
        # this thread waits for the next token; after a normal end it is a no-op.
        if not context.add_callback(stream.close):
            stream.close()          # the call had already ended
            return
        try:
            yield from stream
        finally:
            stream.close()

    def _generation(self, request: pb.GenerateRequest, request_id: str,
                    context: grpc.ServicerContext) -> Iterator[RequestOutput]:
        def submit(engine_id: str):
            params = messages.sampling_from_proto(request.sampling)
            return self._engine.generate(messages.prompt_from_proto(request), params, engine_id)
        return self._outputs(submit, request_id, context)

    def _stream(self, outputs: Iterator[RequestOutput],
                request_id: str) -> Iterator[pb.GenerateResponse]:
        sent_prompt_logprobs = False
        for out in outputs:
            first = not sent_prompt_logprobs and out.prompt_logprobs is not None
            yield messages.delta_response(out, request_id, first)
            sent_prompt_logprobs = sent_prompt_logprobs or first

    def Generate(self, request: pb.GenerateRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        with _status_on_error(context, "Generate", self._on_reject):
            request_id = request.request_id or uuid.uuid4().hex
            yield from self._stream(self._generation(request, request_id, context), request_id)

    def Chat(self, request: pb.ChatRequest,
             context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        with _status_on_error(context, "Chat", self._on_reject):
            request_id = request.request_id or uuid.uuid4().hex

            def submit(engine_id: str):
                params = messages.sampling_from_proto(request.sampling)
                prompt_ids = self._engine.chat_prompt(messages.chat_from_proto(request))
                return self._engine.submit_chat(prompt_ids, params, engine_id)
            yield from self._stream(self._outputs(submit, request_id, context), request_id)

    def Complete(self, request: pb.GenerateRequest,
                 context: grpc.ServicerContext) -> pb.GenerateResponse:
        with _status_on_error(context, "Complete", self._on_reject):
            request_id = request.request_id or uuid.uuid4().hex
            last = None
            for last in self._generation(request, request_id, context):
                pass
            if last is None:        # the call ended before the request started
                return pb.GenerateResponse(request_id=request_id)
            return messages.whole_response(last, request_id)

    def Tokenize(self, request: pb.TokenizeRequest,
                 context: grpc.ServicerContext) -> pb.TokenizeResponse:
        with _status_on_error(context, "Tokenize"):
            self._tenant(context)
            which = request.WhichOneof("input")
            if which == "text":
                return pb.TokenizeResponse(token_ids=self._engine.tokenize(request.text))
            if which == "token_ids":
                skip = (request.skip_special_tokens
                        if request.HasField("skip_special_tokens") else True)
                text = self._engine.detokenize(list(request.token_ids.ids), skip)
                return pb.TokenizeResponse(text=text)
            raise ValueError("text or token_ids must be set")

    def GetModelInfo(self, request: pb.GetModelInfoRequest,
                     context: grpc.ServicerContext) -> pb.ModelInfo:
        with _status_on_error(context, "GetModelInfo"):
            self._tenant(context)
            return self._model_info

    def GetStats(self, request: pb.GetStatsRequest,
                 context: grpc.ServicerContext) -> pb.Stats:
        with _status_on_error(context, "GetStats"):
            self._tenant(context)
            return messages.stats_to_proto(self._engine.stats())


class ColocateServer:
    """A started gRPC server, its health service and the thread pool it owns."""

    def __init__(self, server: grpc.Server, host: str, port: int,
                 executor: ThreadPoolExecutor, health: HealthServicer) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.health = health
        self._executor = executor

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, stop accepting calls, cancel those in flight
        (aborting their requests) after `grace` seconds, and join the handler
        threads. The engine is the caller's to shut down."""
        self.health.stop()
        self.server.stop(grace).wait()
        self._executor.shutdown(wait=True)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)

    def __enter__(self) -> "ColocateServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(engine: EngineProtocol, port: int, tenants: Mapping[str, str], service_name: str,
          model_info: Mapping | pb.ModelInfo | None = None, *, host: str = "127.0.0.1",
          max_concurrent_rpcs: int = 16, health_poll_interval: float = 0.2,
          on_reject: OnReject | None = None, tls: TLSSpec | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> ColocateServer:
    """Start serving `engine` on host:port (port 0 picks a free one; see .port).

    tenants: bearer token -> tenant name; only they may call Generation. Each call
    holds one of `max_concurrent_rpcs` threads while it runs (a stream, for its
    whole life); calls beyond that are refused with RESOURCE_EXHAUSTED rather than
    left waiting. A request message over `max_request_bytes` is refused with
    RESOURCE_EXHAUSTED before it is parsed. tls: serve TLS (mutual TLS with a
    client CA) instead of plaintext. on_reject(reason) hears of every refused
    call: "auth" from any method, the other reasons from Generate and Complete.

    No reflection service is registered: the API is published as a .proto, and
    reflection would only help a stranger map the port.
    """
    info = messages.model_info_to_proto(model_info, service_name)
    credentials = server_credentials(tls) if tls is not None else None  # fail before starting
    engine.start()
    auth = Authenticator(tenants)
    health = HealthServicer(engine, (GENERATION_SERVICE, service_name), health_poll_interval)
    executor = ThreadPoolExecutor(max_concurrent_rpcs,
                                  thread_name_prefix=f"grpc-{service_name}")
    interceptor = AuthInterceptor(auth, (HEALTH_SERVICE,), on_reject=on_reject)
    server = grpc.server(executor, interceptors=[interceptor],
                         options=[("grpc.max_receive_message_length", max_request_bytes)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_GenerationServicer_to_server(
        GenerationServicer(engine, auth, info, on_reject), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise RuntimeError(f"could not bind {address}: {exc}") from None
    server.start()
    return ColocateServer(server, host, bound, executor, health)
