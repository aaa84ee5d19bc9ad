"""The gRPC face of one service: ColocateServicer over an EngineProtocol, and serve().

Errors become status codes here and nowhere else: ValueError (SamplingParams or
engine validation, whose messages name the field and the limit) is
INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED, a stopped engine UNAVAILABLE,
anything else INTERNAL with a fixed message; tracebacks go to the log, never to
the client. A client that cancels (or disconnects) aborts its request, which
frees its KV blocks before the engine's next step.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import grpc

from colocate.engine.engine import LLMEngine
from colocate.engine.outputs import RequestOutput
from colocate.sampling_params import SamplingParams
from colocate.serving.auth import AuthInterceptor, Authenticator
from colocate.serving.engine_protocol import EngineDeadError, EngineProtocol, QueueFullError
from colocate.serving.proto_gen import colocate_pb2 as pb
from colocate.serving.proto_gen import colocate_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
                  "abort": pb.FINISH_REASON_ABORT}


class _Unauthenticated(Exception):
    pass


_STATUS_OF = [
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (_Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
]


@contextlib.contextmanager
def _status_on_error(context: grpc.ServicerContext, method: str):
    """Turn an exception from the body into the call's status. The body must not
    call context.abort itself (its exception would be taken for a bug here)."""
    try:
        yield
    except Exception as exc:
        for kind, code in _STATUS_OF:
            if isinstance(exc, kind):
                context.abort(code, str(exc))
        log.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


# ---- messages <-> Python --------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """The proto's fields carry SamplingParams' own names, so the mapping is by
    name: a field with presence that is unset takes the Python default; an empty
    repeated field means none."""
    kwargs = {}
    for field in msg.DESCRIPTOR.fields:
        if field.is_repeated:
            values = list(getattr(msg, field.name))
            kwargs[field.name] = values or None
        elif not field.has_presence or msg.HasField(field.name):
            kwargs[field.name] = getattr(msg, field.name)
    return SamplingParams(**kwargs)


def prompt_from_proto(request: pb.GenerateRequest) -> str | list[int]:
    which = request.WhichOneof("prompt_input")
    if which == "prompt":
        return request.prompt
    if which == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    raise ValueError("prompt or prompt_token_ids must be set")


def response_from_output(out: RequestOutput, request_id: str,
                         with_prompt_logprobs: bool) -> pb.GenerateResponse:
    resp = pb.GenerateResponse(request_id=request_id, token_ids=out.new_token_ids,
                               text=out.new_text)
    if out.logprobs is not None and out.new_token_ids:
        for entry in out.logprobs[-len(out.new_token_ids):]:
            resp.logprobs.add().logprobs.update(entry)
    if with_prompt_logprobs and out.prompt_logprobs is not None:
        for value in out.prompt_logprobs:
            item = resp.prompt_logprobs.add()
            if value is not None:
                item.logprob = value
    if out.finished:
        resp.finish_reason = FINISH_REASONS[out.finish_reason]
        if isinstance(out.stop_reason, int):
            resp.stop_token_id = out.stop_reason
        elif isinstance(out.stop_reason, str):
            resp.stop_string = out.stop_reason
        resp.usage.prompt_tokens = len(out.prompt_token_ids)
        resp.usage.completion_tokens = len(out.token_ids)
        resp.usage.cached_tokens = out.num_cached_tokens
    return resp


def model_info_from_engine(engine: LLMEngine, **fields) -> dict:
    """The ModelInfo fields an LLMEngine knows (its limits); `fields` add or
    override the rest (model_name, dtype, quantization, ...)."""
    lim = engine.limits
    info = dict(max_model_len=lim.max_model_len, block_size=lim.block_size,
                kv_cache_tokens=(lim.num_blocks - 1) * lim.block_size,
                vocab_size=lim.vocab_size)
    info.update(fields)
    return info


# ---- the servicer ----------------------------------------------------------------
class ColocateServicer(pb_grpc.ColocateServicer):
    def __init__(self, engine: EngineProtocol, authenticator: Authenticator,
                 model_info: pb.ModelInfo) -> None:
        self._engine = engine
        self._auth = authenticator
        self._model_info = model_info

    def _tenant(self, context: grpc.ServicerContext) -> str:
        # The interceptor already refused unknown tokens; asking again gives the
        # tenant's name and keeps the servicer safe if mounted without it.
        tenant = self._auth.tenant_of(context.invocation_metadata())
        if tenant is None:
            raise _Unauthenticated("missing or invalid bearer token")
        return tenant

    def Generate(self, request: pb.GenerateRequest,
                 context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        with _status_on_error(context, "Generate"):
            tenant = self._tenant(context)
            params = sampling_from_proto(request.sampling)
            prompt = prompt_from_proto(request)
            client_id = request.request_id or uuid.uuid4().hex
            # Namespaced by tenant: two tenants may pick the same request_id.
            stream = self._engine.generate(prompt, params, f"{tenant}/{client_id}")
            # On cancellation or disconnect gRPC runs the callback: abort the
            # request now, even while this thread waits for the next token.
            if not context.add_callback(stream.close):
                stream.close()          # the call already ended
                return
            try:
                sent_prompt_logprobs = False
                for out in stream:
                    first = not sent_prompt_logprobs and out.prompt_logprobs is not None
                    yield response_from_output(out, client_id, first)
                    sent_prompt_logprobs = sent_prompt_logprobs or first
            finally:
                stream.close()

    def GetModelInfo(self, request: pb.GetModelInfoRequest,
                     context: grpc.ServicerContext) -> pb.ModelInfo:
        with _status_on_error(context, "GetModelInfo"):
            self._tenant(context)
            return self._model_info

    def Health(self, request: pb.HealthRequest,
               context: grpc.ServicerContext) -> pb.HealthResponse:
        with _status_on_error(context, "Health"):
            self._tenant(context)
            stats = self._engine.stats()
            resp = pb.HealthResponse(
                status=pb.HealthResponse.SERVING, num_running=stats.num_running,
                num_waiting=stats.num_waiting, kv_blocks_used=stats.kv_blocks_used,
                kv_blocks_total=stats.kv_blocks_total)
            try:
                self._engine.check_health()
            except EngineDeadError as exc:
                resp.status = pb.HealthResponse.NOT_SERVING
                resp.message = str(exc)
            return resp


# ---- the server ------------------------------------------------------------------
class ColocateServer:
    """A started gRPC server and the thread pool it owns."""

    def __init__(self, server: grpc.Server, host: str, port: int,
                 executor: ThreadPoolExecutor) -> None:
        self.server = server
        self.host = host
        self.port = port
        self._executor = executor

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, cancel those in flight (aborting their requests)
        after `grace` seconds, and join the handler threads."""
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
          max_workers: int = 16) -> ColocateServer:
    """Start serving `engine` on host:port (port 0 picks a free one; see .port).

    tenants: bearer token -> tenant name. Each streaming call holds one of
    `max_workers` threads while it runs; calls beyond that are refused with
    RESOURCE_EXHAUSTED rather than left waiting.
    """
    info = pb.ModelInfo()
    if isinstance(model_info, pb.ModelInfo):
        info.CopyFrom(model_info)
    elif model_info is not None:
        info = pb.ModelInfo(**model_info)
    info.service_name = service_name
    engine.start()
    auth = Authenticator(tenants)
    servicer = ColocateServicer(engine, auth, info)
    executor = ThreadPoolExecutor(max_workers, thread_name_prefix=f"grpc-{service_name}")
    server = grpc.server(executor, interceptors=[AuthInterceptor(auth)],
                         maximum_concurrent_rpcs=max_workers)
    pb_grpc.add_ColocateServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        executor.shutdown(wait=False)
        raise RuntimeError(f"could not bind {host}:{port}: {exc}") from None
    server.start()
    return ColocateServer(server, host, bound, executor)
