"""Build an EngineGroup over one model: one runner, one KV cache, one block range
per member (colocate/engine/group.py says what the group does).

The cache holds the null block plus every member's blocks, back to back, so each
member's budget is a block range fixed at construction: no member can allocate
into another's, and the attention kernels need no change (a block id is a block id).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from colocate.engine.block_pool import KV_BLOCK_SIZE
from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.engine.group import EngineGroup
from colocate.model.kv_cache import resolve_kv_cache_dtype
from colocate.model.model_config import LlamaConfig
from colocate.sizes import cdiv
from colocate.worker.model_runner import ModelRunner


@dataclass(frozen=True)
class GroupMember:
    """One service of a fused group: what its own engine is sized and limited by."""
    name: str
    kv_tokens: int
    max_model_len: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    weight: float = 1.0
    enable_prefix_caching: bool = True


def build_engine_group(model: torch.nn.Module, config: LlamaConfig, tokenizer,
                       members: Sequence[GroupMember], *, dtype: torch.dtype,
                       device: torch.device, max_num_batched_tokens: int,
                       kv_cache_dtype: str = "auto",
                       block_size: int = KV_BLOCK_SIZE) -> EngineGroup:
    """A group stepping `members` as one batch of at most max_num_batched_tokens."""
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"group members need distinct names, got {names}")
    usable = [cdiv(m.kv_tokens, block_size) for m in members]
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype, device)
    runner = ModelRunner(model, config, 1 + sum(usable), block_size, dtype, device, kv_dtype)
    eos = tuple(tokenizer.eos_token_ids if tokenizer else config.eos_token_ids)
    engines, first = {}, 1
    for member, blocks in zip(members, usable):
        limits = EngineLimits(
            vocab_size=config.vocab_size, max_model_len=member.max_model_len,
            block_size=block_size, num_blocks=blocks + 1, max_num_seqs=member.max_num_seqs,
            max_num_batched_tokens=member.max_num_batched_tokens,
            enable_prefix_caching=member.enable_prefix_caching, first_block_id=first)
        engines[member.name] = LLMEngine(runner, limits, tokenizer, eos,
                                         request_id_prefix=f"{member.name}-")
        first += blocks
    return EngineGroup(runner, engines, max_num_batched_tokens,
                       {m.name: m.weight for m in members})
