"""The OpenAI-compatible HTTP face of one service, beside its gRPC port: aiohttp on
an event loop of its own thread, over the same front (AsyncEngine) as gRPC.

    GET  /v1/models             the service's model (tenants only)
    POST /v1/chat/completions   a conversation through the model's chat template
    POST /v1/completions        a prompt (text or token ids)
    GET  /health                200 while the engine serves, 503 when not (open)

The same rules as the gRPC door: a tenant's `Authorization: Bearer` token (the
same Authenticator: SHA-256 digests compared in constant time, never logged; no
access log is written at all), the same queue (429 when full), the same request
size limit (413) and TLS files, 503 while draining. A limit on requests in flight
(the gRPC door's max_concurrent_rpcs) answers 429 past it. Errors use OpenAI's
JSON shape. A client that disconnects cancels its handler (aiohttp's
handler_cancellation), whose `finally` closes the stream: the engine aborts the
request before its next step and frees its blocks.

The engine's streams block, so waiting for the next output runs on a thread pool
sized to the in-flight limit: the event loop never waits on the engine's lock.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from colocate.config import DEFAULT_MAX_REQUEST_BYTES, TLSSpec
from colocate.service.auth import Authenticator
from colocate.service.engine_protocol import EngineDeadError, EngineProtocol, QueueFullError
from colocate.service.grpc_server import OnReject, rejection_reason
from colocate.service.openai_protocol import (OpenAIError, OpenAIRequest, field_named,
                                              parse_body, parse_chat, parse_completion)
from colocate.service.openai_responses import ReplyWriter, model_list
from colocate.service.tls import server_ssl_context

log = logging.getLogger(__name__)

# Engine errors -> HTTP status. A model without a chat template (NoChatTemplateError,
# a ValueError) is a 400 too, as vLLM answers it.
_STATUS_OF = [(ValueError, 400), (QueueFullError, 429), (EngineDeadError, 503)]
_END = object()
MAX_BYTES = web.AppKey("max_bytes", int)


def _next(stream):
    return next(stream, _END)


class OpenAIApp:
    """The handlers, over one engine; `names` are the model names it answers to,
    the first listed by /v1/models."""

    def __init__(self, engine: EngineProtocol, authenticator: Authenticator,
                 names: Sequence[str], service_name: str, max_in_flight: int,
                 on_reject: OnReject | None = None) -> None:
        self.engine, self.auth, self.names = engine, authenticator, list(names)
        self.service_name, self.max_in_flight = service_name, max_in_flight
        self.on_reject = on_reject
        self.in_flight = 0
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix=f"http-{service_name}")

    def routes(self) -> list:
        return [web.get("/v1/models", self.models), web.get("/health", self.health),
                web.post("/v1/chat/completions", self.chat),
                web.post("/v1/completions", self.completions)]

    # ---- handlers --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        try:
            self.engine.check_health()
        except EngineDeadError as exc:
            return web.json_response({"status": "unavailable", "reason": str(exc)}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        self._tenant(request)
        return web.json_response(model_list(self.names[:1], self.service_name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    # ---- one generation --------------------------------------------------------------
    async def _generate(self, request: web.Request, parse: Callable) -> web.StreamResponse:
        tenant = self._tenant(request)
        if self.in_flight >= self.max_in_flight:
            raise OpenAIError(429, f"{self.in_flight} requests are in flight on this port "
                                   f"(the limit is {self.max_in_flight}); retry later")
        self.in_flight += 1
        try:
            try:
                parsed = parse(parse_body(await request.read()))
            except web.HTTPRequestEntityTooLarge:
                raise OpenAIError(413, f"the request body is over {request.app[MAX_BYTES]} "
                                       "bytes") from None
            if parsed.model is not None and parsed.model not in self.names:
                raise OpenAIError(404, f"the model {parsed.model!r} does not exist here; "
                                       f"this service serves {self.names[0]!r}", "model")
            loop = asyncio.get_running_loop()
            rid = f"{tenant}/http-{uuid.uuid4().hex}"
            stream = await self._run(loop, self._submit, parsed, rid)
            try:
                writer = ReplyWriter(parsed.chat, parsed.model or self.names[0],
                                     self._token_text, parsed.logprobs)
                if parsed.stream:
                    return await self._send_stream(request, loop, stream, writer, parsed)
                final = None
                while (out := await self._run(loop, _next, stream)) is not _END:
                    final = out
                if final is None:
                    raise EngineDeadError("the request ended before it started")
                return web.json_response(writer.whole(final))
            finally:
                stream.close()      # a no-op after the end; else aborts (a disconnect)
        finally:
            self.in_flight -= 1

    def _submit(self, parsed: OpenAIRequest, request_id: str):
        """Thread pool: render or tokenize, then queue (this takes the engine's lock)."""
        if parsed.chat:
            ids = self.engine.chat_prompt(parsed.messages)
        elif isinstance(parsed.prompt, str):
            ids = self.engine.tokenize(parsed.prompt)
        else:
            ids = parsed.prompt
        params = parsed.build_params(self._room(len(ids)))
        if parsed.chat:
            return self.engine.submit_chat(ids, params, request_id)
        return self.engine.generate(ids, params, request_id)

    def _room(self, prompt_len: int) -> int:
        """Without max_tokens, a reply may take what the context and the pool leave."""
        limits = getattr(getattr(self.engine, "engine", None), "limits", None)
        if limits is None:
            return 16
        pool_tokens = (limits.num_blocks - 1) * limits.block_size
        return min(limits.max_model_len, pool_tokens) - prompt_len

    async def _send_stream(self, request, loop, stream, writer: ReplyWriter,
                           parsed: OpenAIRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        final = None
        try:
            while (out := await self._run(loop, _next, stream)) is not _END:
                final = out
                chunk = writer.chunk(out)
                if chunk is not None:
                    await response.write(_event(chunk))
            if parsed.include_usage and final is not None:
                await response.write(_event(writer.usage_chunk(final)))
        except OpenAIError as exc:           # the headers are gone: say it in the stream
            await response.write(_event(exc.body()))
        except Exception:                     # the engine failed this request (INTERNAL)
            log.exception("a streamed %s failed", "chat" if parsed.chat else "completion")
            await response.write(_event(OpenAIError(500, "internal error").body()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _run(self, loop, fn, *args):
        """fn on the pool; an engine error becomes the OpenAIError a client expects."""
        try:
            return await loop.run_in_executor(self.pool, fn, *args)
        except OpenAIError:
            raise
        except Exception as exc:
            for kind, status in _STATUS_OF:
                if isinstance(exc, kind):
                    param = field_named(str(exc)) if status == 400 else None
                    raise OpenAIError(status, str(exc), param, rejection_reason(exc)) from None
            raise

    def _tenant(self, request: web.Request) -> str:
        header = request.headers.get("Authorization")
        tenant = self.auth.tenant_of([("authorization", header)] if header else None)
        if tenant is None:
            message = "invalid bearer token" if header else "missing bearer token"
            log.info("refused %s %s: %s", request.method, request.path, message)
            raise OpenAIError(401, message)
        return tenant

    def _token_text(self, token_id: int) -> str:
        return self.engine.detokenize([token_id], False)


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def error_middleware(on_reject: OnReject | None):
    """Every answer that is not a success in OpenAI's error shape, each refusal counted
    by reason; a bug is a 500 with a fixed message (the traceback goes to the log only)."""

    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except OpenAIError as exc:
            if on_reject is not None and exc.reason is not None:
                on_reject(exc.reason)
            return web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:        # aiohttp's own: 404 route, 405 method, ...
            if exc.status < 400:
                raise
            return web.json_response(OpenAIError(exc.status, exc.reason).body(),
                                     status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response(OpenAIError(500, "internal error").body(), status=500)

    return errors


class HttpServer:
    """A started HTTP door: its own thread runs the event loop until stop()."""

    def __init__(self, app: OpenAIApp, host: str, port: int, tls: TLSSpec | None,
                 max_request_bytes: int) -> None:
        ssl_context = server_ssl_context(tls) if tls is not None else None  # fail first
        self.app, self.host, self.tls = app, host, tls
        self._loop = asyncio.new_event_loop()
        web_app = web.Application(client_max_size=max_request_bytes,
                                  middlewares=[error_middleware(app.on_reject)])
        web_app[MAX_BYTES] = max_request_bytes
        web_app.add_routes(app.routes())
        # No access log: a line per request is noise, and headers stay out of logs.
        self._runner = web.AppRunner(web_app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=1.0)
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name=f"http-{app.service_name}", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._start(port, ssl_context))
        except BaseException:
            self.stop()
            raise

    async def _start(self, port: int, ssl_context) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise RuntimeError(f"could not bind {self.host}:{port}: {exc}") from None
        return site._server.sockets[0].getsockname()[1]

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def stop(self) -> None:
        """Close the port, cancel the handlers still running (aborting their requests),
        end the loop's thread and the pool. Idempotent."""
        if not self._loop.is_closed():
            if self._thread.is_alive():
                self._call(self._runner.cleanup())
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
            self._loop.close()
        self.app.pool.shutdown(wait=True)


def serve_http(engine: EngineProtocol, port: int, tenants, service_name: str,
               names: Sequence[str], *, host: str = "127.0.0.1", tls: TLSSpec | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_in_flight: int = 16,
               on_reject: OnReject | None = None) -> HttpServer:
    """Serve `engine`'s OpenAI API on host:port (0: a free one, see .port). tenants:
    bearer token -> tenant name, as serve() takes them; names: the model names
    requests may give (the first is listed)."""
    if not names:
        raise ValueError("an HTTP door needs at least one model name")
    app = OpenAIApp(engine, Authenticator(tenants), names, service_name, max_in_flight,
                    on_reject)
    return HttpServer(app, host, port, tls, max_request_bytes)
