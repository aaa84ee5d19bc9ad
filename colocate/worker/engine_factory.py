"""Build engines over an already-built model: one engine (LLM, a service alone), or an
engine group (the services of a fused group), each from EngineConfigs made once.

LLM uses it with a model it loaded, a service with a model whose weights it maps
from the shared store. A group gets one runner and one KV cache holding the null
block plus every member's blocks, back to back, so each member's budget is a block
range fixed at construction: no member can allocate into another's, and attention
needs no change (a block id is a block id).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from colocate.engine.config import EngineConfig
from colocate.engine.engine import EngineLimits, LLMEngine
from colocate.engine.group import EngineGroup
from colocate.engine.shared_lending import LendingCircle, SharedKVLending
from colocate.model.kv_cache import resolve_kv_cache_dtype
from colocate.model.model_config import LlamaConfig
from colocate.worker.model_runner import ModelRunner


def _limits(config: LlamaConfig, engine: EngineConfig, first_block_id: int = 1) -> EngineLimits:
    return EngineLimits(
        vocab_size=config.vocab_size, max_model_len=engine.max_model_len,
        block_size=engine.block_size, num_blocks=engine.num_blocks,
        max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
        enable_prefix_caching=engine.enable_prefix_caching, first_block_id=first_block_id,
        max_prefill_tokens_per_mixed_step=engine.max_prefill_tokens_per_mixed_step)


def _eos(config: LlamaConfig, tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.eos_token_ids if tokenizer else config.eos_token_ids)


def build_engine(model: torch.nn.Module, config: LlamaConfig, tokenizer,
                 engine: EngineConfig, *, dtype: torch.dtype, device: torch.device,
                 circle: LendingCircle | None = None, name: str = "") -> LLMEngine:
    """One engine, its runner and its KV pool: its own, or (circle) the range `name`
    owns of an isolated lending circle's one pool file, lending through its exchange."""
    kv_dtype = resolve_kv_cache_dtype(engine.kv_cache_dtype, dtype, device)
    num_blocks, first, shared = engine.num_blocks, 1, {}
    if circle is not None:
        first, usable = circle.own_blocks(name)
        if usable != engine.num_blocks - 1:
            raise ValueError(f"{name!r} has {engine.num_blocks - 1} blocks; its range of "
                             f"the lending circle has {usable}")
        num_blocks = circle.num_blocks
        shared = dict(kv_shared_file=circle.pool_path, kv_own_blocks=(first, usable))
    runner = ModelRunner(model, config, num_blocks, engine.block_size, dtype, device,
                         kv_dtype, **shared)
    llm = LLMEngine(runner, _limits(config, engine, first), tokenizer, _eos(config, tokenizer))
    if circle is not None:
        lends = circle.members[circle.index(name)][2]
        llm.kv.join_lending(SharedKVLending(circle), name, lends, llm.scheduler)
    return llm


@dataclass(frozen=True)
class GroupMember:
    """One service of a fused group: its name, its engine, its share of the steps,
    and whether its free blocks serve the others (colocate/engine/kv_lending.py)."""
    name: str
    engine: EngineConfig
    weight: float = 1.0
    lend: bool = False


def build_engine_group(model: torch.nn.Module, config: LlamaConfig, tokenizer,
                       members: Sequence[GroupMember], *, dtype: torch.dtype,
                       device: torch.device, max_num_batched_tokens: int) -> EngineGroup:
    """A group stepping `members` as one batch of at most max_num_batched_tokens."""
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"group members need distinct names, got {names}")
    shapes = {(m.engine.block_size, m.engine.kv_cache_dtype) for m in members}
    if len(shapes) != 1:
        raise ValueError("the members of a group share one KV cache: they need one block "
                         f"size and one kv_cache_dtype, got {sorted(shapes)}")
    (block_size, kv_cache_dtype), = shapes
    kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, dtype, device)
    usable = [m.engine.num_blocks - 1 for m in members]
    runner = ModelRunner(model, config, 1 + sum(usable), block_size, dtype, device, kv_dtype)
    engines, first = {}, 1
    for member, blocks in zip(members, usable):
        engines[member.name] = LLMEngine(runner, _limits(config, member.engine, first),
                                         tokenizer, _eos(config, tokenizer),
                                         request_id_prefix=f"{member.name}-")
        first += blocks
    # One cap and one time slice for the group's steps: the strictest a member asked for.
    return EngineGroup(runner, engines, max_num_batched_tokens,
                       {m.name: m.weight for m in members},
                       lenders=[m.name for m in members if m.lend],
                       max_prefill_tokens_per_mixed_step=min(
                           m.engine.max_prefill_tokens_per_mixed_step for m in members),
                       time_slice_s=min(m.engine.time_slice_s for m in members))
