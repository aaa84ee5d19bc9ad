"""Engines served over real gRPC on 127.0.0.1:0, for the serving and security
tests: one starter, stopped together after the test."""
from __future__ import annotations

from dataclasses import dataclass, field

from colocate.client import Client
from colocate.engine.engine import LLMEngine
from colocate.service.async_engine import AsyncEngine
from colocate.service.grpc_server import ColocateServer, model_info_from_engine, serve
from colocate.service.http_server import HttpServer, serve_http
from tests.service.helpers import make_llm_engine

TENANTS = {"token-team-a": "team-a", "token-team-b": "team-b"}
TOKEN = "token-team-a"


@dataclass
class Service:
    llm_engine: LLMEngine
    engine: AsyncEngine
    server: ColocateServer
    http: HttpServer | None = None     # the OpenAI-compatible door, when started with one
    clients: list = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.server.target

    def client(self, token: str | None = TOKEN, timeout: float | None = 30) -> Client:
        client = Client(self.server.target, token, timeout=timeout)   # None: no header
        self.clients.append(client)
        return client

    def openai(self, token: str = TOKEN, **kwargs):
        """The official `openai` SDK's client for the HTTP door."""
        import openai

        return openai.OpenAI(base_url=f"{self.http.url}/v1", api_key=token, max_retries=0,
                             **kwargs)

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        if self.http is not None:
            self.http.stop()
        self.server.stop()
        self.engine.shutdown()


class ServiceStarter:
    """Starts services (fake-runner engines unless given one) with `serve_defaults`
    under any per-call serve() settings; `stop_all` ends every one it started."""

    def __init__(self, name: str, **serve_defaults) -> None:
        self.name = name
        self.serve_defaults = serve_defaults
        self.started: list[Service] = []

    def start(self, llm_engine: LLMEngine | None = None, engine: AsyncEngine | None = None,
              tenants=TENANTS, name: str | None = None, serve_kwargs: dict | None = None,
              http: dict | None = None, **engine_kwargs) -> Service:
        """http: serve_http()'s keywords (model `names` at least) to open the HTTP door too."""
        llm_engine = llm_engine or make_llm_engine()
        engine = engine or AsyncEngine(llm_engine, **engine_kwargs)
        server = serve(engine, 0, tenants, name or self.name,
                       model_info_from_engine(llm_engine, model_name="fake"),
                       **{**self.serve_defaults, **(serve_kwargs or {})})
        service = Service(llm_engine, engine, server)
        self.started.append(service)
        if http is not None:
            service.http = serve_http(engine, 0, tenants, name or self.name, **http)
        return service

    def stop_all(self) -> None:
        for s in self.started:
            s.stop()


# ChatML, as SmolLM2 and many others write it; enough to render any conversation.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def with_chat_template(model_dir, into):
    """A copy of a checkpoint directory with a ChatML chat_template.jinja added."""
    import shutil
    from pathlib import Path

    into = Path(into)
    shutil.copytree(model_dir, into, dirs_exist_ok=True)
    (into / "chat_template.jinja").write_text(CHATML)
    return into
