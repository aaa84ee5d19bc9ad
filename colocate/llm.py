"""LLM: the offline API. Load a checkpoint, generate for a batch of prompts."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from colocate.engine.block_pool import KV_BLOCK_SIZE
from colocate.engine.config import EngineConfig
from colocate.engine.outputs import RequestOutput
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
from colocate.model.kv_cache import resolve_kv_cache_dtype
from colocate.model.checkpoint import parse_dtype
from colocate.quant.loading import load_model
from colocate.model.chat_template import NoChatTemplateError, is_conversation_list
from colocate.model.model_config import LlamaConfig
from colocate.model.tokenizer import load_tokenizer
from colocate.prompt_inputs import normalize_prompts
from colocate.sampling_params import SamplingParams
from colocate.worker.engine_factory import build_engine

DEFAULT_KV_CACHE_TOKENS = 8192


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda:N', got {name!r}")
    return device



class LLM:
    def __init__(self, model: str, dtype: str = "float32", quantization: str | None = None,
                 kv_cache_dtype: str = "auto", device: str = "cpu", block_size: int = KV_BLOCK_SIZE,
                 kv_cache_tokens: int | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_prefix_caching: bool = True,
                 quant_group_size: int | None = None,
                 max_prefill_tokens_per_mixed_step: int =
                 DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP) -> None:
        """quantization: None | "int8" (per channel) | "int4" (groups of quant_group_size
        input channels, default 128); AWQ / GPTQ checkpoints load as int4 regardless."""
        torch_device = resolve_device(device)
        path = Path(model)
        self.config = LlamaConfig.from_pretrained(path)
        torch_dtype = parse_dtype(dtype, self.config)                       # "auto": the checkpoint's
        resolve_kv_cache_dtype(kv_cache_dtype, torch_dtype, torch_device)   # fail before loading
        self.engine_config = EngineConfig(
            max_model_len=(self.config.max_position_embeddings if max_model_len is None
                           else max_model_len),
            kv_cache_tokens=(DEFAULT_KV_CACHE_TOKENS if kv_cache_tokens is None
                             else kv_cache_tokens),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, enable_prefix_caching=enable_prefix_caching,
            max_prefill_tokens_per_mixed_step=max_prefill_tokens_per_mixed_step,
            kv_cache_dtype=kv_cache_dtype)

        self.model = load_model(path, dtype=torch_dtype, device=str(torch_device),
                                quantization=quantization, quant_group_size=quant_group_size)
        self.tokenizer = load_tokenizer(path)
        self.engine = build_engine(self.model, self.config, self.tokenizer, self.engine_config,
                                   dtype=torch_dtype, device=torch_device)

    def generate(self, prompts: Any,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt together; outputs come back in the order of the
        prompts. A prompt is text, token ids, {"prompt": text} or {"prompt_token_ids":
        ids} (colocate/prompt_inputs.py); one prompt or a list of them."""
        prompts = normalize_prompts(prompts)
        return self._run(prompts, _per_prompt(sampling_params, len(prompts)))

    def chat(self, messages: Any,
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to a list
        of conversations, through the checkpoint's chat template, as vLLM's LLM.chat.
        Replies stop at EOS or at the template's end-of-turn token."""
        if self.tokenizer is None:
            raise NoChatTemplateError()
        conversations = messages if is_conversation_list(messages) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt)
                   for c in conversations]
        params = [self.tokenizer.chat_params(p)
                  for p in _per_prompt(sampling_params, len(prompts))]
        return self._run(prompts, params)

    def _run(self, prompts: list, params: list[SamplingParams]) -> list[RequestOutput]:
        # Validate all before adding any, so a bad prompt leaves the engine as it was.
        tokenized = [self.engine.tokenize(p) for p in prompts]
        for ids, p in zip(tokenized, params):
            self.engine.validate(ids, p)
        ids = [self.engine.add_request(t, p) for t, p in zip(tokenized, params)]
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in final:
                    self.engine.abort_request(rid)
        return [final[rid] for rid in ids]


def _per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the same for all, or a list of exactly n."""
    if sampling_params is None:
        sampling_params = SamplingParams()
    params = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
              else [sampling_params] * n)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
    return params
