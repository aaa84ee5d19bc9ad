"""EngineConfig: everything one engine is built from, frozen, made once.

A service makes it from its ServiceSpec and the budget the arbiter admitted
(`from_service`); LLM from its keywords. The engine factory
(colocate/worker/engine_factory.py) builds the runner, the KV pool and the engine
from it whole, so no layer re-spells the limits. Validated at construction: a bad
value is a ValueError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from colocate.engine.block_pool import KV_BLOCK_SIZE, pool_blocks
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
from colocate.engine.time_shares import DEFAULT_TIME_SLICE_S


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    kv_cache_tokens: int                 # the pool's budget, in tokens
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = KV_BLOCK_SIZE
    enable_prefix_caching: bool = True
    # "auto" (the model's dtype) | "int8"; checked where the cache is built
    # (model/kv_cache.py: resolve_kv_cache_dtype), which knows the device too.
    kv_cache_dtype: str = "auto"
    # Prefill tokens a step that holds a decode may take (engine/scheduler.py).
    max_prefill_tokens_per_mixed_step: int = DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
    # Engine time a fused group's member may lead by before it sits out steps
    # (engine/time_shares.py); an engine alone has no one to lead.
    time_slice_s: float = DEFAULT_TIME_SLICE_S

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)
                                    or value < 1):
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
        if not self.time_slice_s > 0:
            raise ValueError(f"time_slice_s must be > 0 seconds, got {self.time_slice_s!r}")
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be >= block_size ({self.block_size}), "
                             f"got {self.kv_cache_tokens}")

    @property
    def num_blocks(self) -> int:
        """The pool's size: the budget's blocks plus the null block."""
        return pool_blocks(self.kv_cache_tokens, self.block_size)

    @classmethod
    def from_service(cls, spec, kv_tokens: int) -> "EngineConfig":
        """A service's engine: its YAML limits and the budget it was admitted with."""
        return cls(max_model_len=spec.max_model_len, kv_cache_tokens=kv_tokens,
                   max_num_seqs=spec.max_num_seqs,
                   max_num_batched_tokens=spec.max_num_batched_tokens,
                   kv_cache_dtype=spec.kv_cache.dtype,
                   max_prefill_tokens_per_mixed_step=spec.max_prefill_tokens_per_mixed_step,
                   time_slice_s=spec.time_slice)
