"""A fixture that serves an engine over real gRPC (and HTTP, if asked) with any of
serve()'s security settings (TLS, message and concurrency limits), and stops it after
the test."""
from __future__ import annotations

import pytest

from colocate.engine.engine import LLMEngine
from tests.service.served import TENANTS, TOKEN, Service, ServiceStarter  # noqa: F401


@pytest.fixture
def start_server():
    starter = ServiceStarter("secure")

    def start(llm_engine: LLMEngine | None = None, tenants=TENANTS, name: str = "secure",
              http: dict | None = None, **serve_kwargs) -> Service:
        """http: serve_http()'s keywords, to open the HTTP door too."""
        return starter.start(llm_engine, tenants=tenants, name=name, serve_kwargs=serve_kwargs,
                             http=http)

    yield start
    starter.stop_all()


def engine_with_tokenizer(model_dir, max_model_len: int = 128) -> LLMEngine:
    """The fake runner (no model, instant steps) behind a real tokenizer, so text
    prompts, stop strings and detokenization take the served path."""
    from colocate.engine.engine import EngineLimits
    from colocate.model.tokenizer import load_tokenizer
    from colocate.model.tiny import PRESETS
    from tests.engine.fake_runner import FakeRunner

    tokenizer = load_tokenizer(model_dir)
    vocab = PRESETS["tiny"]["vocab_size"]
    limits = EngineLimits(vocab_size=vocab, max_model_len=max_model_len, block_size=4,
                          num_blocks=2 * max_model_len // 4 + 1, max_num_seqs=4,
                          max_num_batched_tokens=max_model_len)
    return LLMEngine(FakeRunner(4, vocab), limits, tokenizer, tokenizer.eos_token_ids)
