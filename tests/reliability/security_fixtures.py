"""A fixture that serves an engine over real gRPC with any of serve()'s security
settings (TLS, message and concurrency limits), and stops it after the test."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from colocate.engine.engine import LLMEngine
from colocate.serving.async_engine import AsyncEngine
from colocate.serving.grpc_server import ColocateServer, model_info_from_engine, serve
from tests.serving.helpers import make_llm_engine

TENANTS = {"token-team-a": "team-a", "token-team-b": "team-b"}
TOKEN = "token-team-a"


@dataclass
class Served:
    llm_engine: LLMEngine
    engine: AsyncEngine
    server: ColocateServer

    @property
    def target(self) -> str:
        return self.server.target


@pytest.fixture
def start_server():
    started: list[Served] = []

    def start(llm_engine: LLMEngine | None = None, tenants=TENANTS, name: str = "secure",
              **serve_kwargs) -> Served:
        llm_engine = llm_engine or make_llm_engine()
        engine = AsyncEngine(llm_engine)
        server = serve(engine, 0, tenants, name,
                       model_info_from_engine(llm_engine, model_name="fake"), **serve_kwargs)
        started.append(Served(llm_engine, engine, server))
        return started[-1]

    yield start
    for s in started:
        s.server.stop()
        s.engine.shutdown()


def engine_with_tokenizer(model_dir, max_model_len: int = 128) -> LLMEngine:
    """The fake runner (no model, instant steps) behind a real tokenizer, so text
    prompts, stop strings and detokenization take the served path."""
    from colocate.engine.engine import EngineLimits
    from colocate.llm import load_tokenizer
    from colocate.model.tiny import PRESETS
    from tests.engine.fake_runner import FakeRunner

    tokenizer = load_tokenizer(model_dir)
    vocab = PRESETS["tiny"]["vocab_size"]
    limits = EngineLimits(vocab_size=vocab, max_model_len=max_model_len, block_size=4,
                          num_blocks=2 * max_model_len // 4 + 1, max_num_seqs=4,
                          max_num_batched_tokens=max_model_len)
    return LLMEngine(FakeRunner(4, vocab), limits, tokenizer, tokenizer.eos_token_ids)
