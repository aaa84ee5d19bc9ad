"""What the fuzz tests share: hypothesis settings and the tiny model with a chat template."""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def fuzz_settings(default_examples: int) -> settings:
    """FUZZ_EXAMPLES=2000 in the environment for a longer hunt."""
    return settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", default_examples)),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_chat_llm(tiny_model_dir, tmp_path_factory, max_model_len: int, kv_cache_tokens: int):
    """The tiny model, with a chat template so that chat requests reach the rendering,
    the engine and the sampler: a real model, so extreme sampling values reach the
    arithmetic they could break."""
    from colocate.llm import LLM
    from tests.service.served import with_chat_template

    model_dir = with_chat_template(tiny_model_dir, tmp_path_factory.mktemp("fuzz") / "tiny")
    return LLM(model=str(model_dir), kv_cache_tokens=kv_cache_tokens,
               max_model_len=max_model_len, max_num_seqs=4)
