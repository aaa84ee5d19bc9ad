"""A factory fixture that serves an engine on 127.0.0.1:0 and cleans up after."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from colocate.client import Client
from colocate.engine.engine import LLMEngine
from colocate.serving.async_engine import AsyncEngine
from colocate.serving.grpc_server import ColocateServer, model_info_from_engine, serve
from tests.serving.helpers import make_llm_engine

TENANTS = {"token-team-a": "team-a", "token-team-b": "team-b"}
TOKEN = "token-team-a"


@dataclass
class Service:
    llm_engine: LLMEngine
    engine: AsyncEngine
    server: ColocateServer
    clients: list

    def client(self, token: str | None = TOKEN, timeout: float | None = 30) -> Client:
        client = Client(self.server.target, token, timeout=timeout)   # None: no header
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.server.stop()
        self.engine.shutdown()


@pytest.fixture
def make_service():
    services = []

    def start(llm_engine: LLMEngine | None = None, engine=None, tenants=TENANTS,
              name: str = "chat-test", **engine_kwargs) -> Service:
        llm_engine = llm_engine or make_llm_engine()
        engine = engine or AsyncEngine(llm_engine, **engine_kwargs)
        # A short health poll, so tests see an engine's death quickly.
        server = serve(engine, 0, tenants, name,
                       model_info_from_engine(llm_engine, model_name="fake"),
                       health_poll_interval=0.02)
        service = Service(llm_engine, engine, server, [])
        services.append(service)
        return service

    yield start
    for s in services:
        s.stop()
