"""LLaMA-2/3 and Mistral decoder over a flat, unpadded batch with a paged KV cache.

Layout differs from HF in one way: q/k/v are one `qkv_proj` and gate/up one
`gate_up_proj`, so a layer runs 4 matmuls instead of 7 (fewer Python and kernel
launches at batch-1 decode). The loader fuses HF's separate weights into them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colocate.model.attention import AttentionPlan, attend
from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.kv_cache import LayerKVCache
from colocate.model.kv_cache import allocate_kv_caches as _allocate
from colocate.model.model_config import LlamaConfig
from colocate.model.rope import RotaryEmbedding

KVCache = LayerKVCache


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's formula: normalize in float32, cast back, then scale. Written out, it is
        # also faster than F.rms_norm for a single row on this CPU (16 vs 28 us).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        # What prefill attention computes in when not the activations' dtype: the loader
        # sets bfloat16 on a CPU model whose linears prefill in bf16 (colocate/quant/
        # loading.py), so the whole prefill is what HF's bf16 mode computes.
        self.prefill_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, kv_cache: KVCache,
                plan: AttentionPlan, slot_mapping: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)                                             # (T, (nh + 2 nkv) hd)
        # q and k heads sit side by side in qkv, so one RoPE call rotates both.
        qk = qkv[:, : self.q_size + self.kv_size].view(T, -1, self.head_dim)
        qk = RotaryEmbedding.rotate(qk, cos_sin)                            # (T, nh + nkv, hd)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        o = attend(q, k, v, kv_cache, plan, slot_mapping, self.scale,
                   self.prefill_dtype)                                     # (T, nh * hd)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size,
                                      bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size,
                                   bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # (T, I) each
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, h: torch.Tensor, cos_sin: torch.Tensor, kv_cache: KVCache,
                plan: AttentionPlan, slot_mapping: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos_sin, kv_cache, plan, slot_mapping)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow HF (model.layers.N....) except the two fused projections."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.rotary = RotaryEmbedding(config)
        # Tied checkpoints have no lm_head tensor: logits reuse the embedding matrix.
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], attn_metadata: AttentionMetadata) -> torch.Tensor:
        """Flat batch (T,) of token ids at `positions` -> final hidden states (T, hidden)."""
        plan = AttentionPlan.build(attn_metadata)
        cos_sin = self.rotary.lookup(positions)                            # (T, 2, 1, hd)
        slots = attn_metadata.slot_mapping
        h = self.model.embed_tokens(input_ids)                             # (T, H)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            h = layer(h, cos_sin, kv_cache, plan, slots)
        return self.model.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32. The head is the embedding when tied, unless
        the loader gave it a module of its own (a quantized copy, see QuantConfig)."""
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def weight_bytes(self) -> int:
        """Bytes of parameters (the rope table is a buffer and not counted)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def allocate_kv_caches(config: LlamaConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu") -> list[KVCache]:
    """Zeroed caches per layer, each (num_blocks, block_size, nkv, hd) in `dtype`;
    torch.int8 stores quantized K/V with fp32 scales (see colocate.model.kv_cache)."""
    return _allocate(config.num_hidden_layers, num_blocks, block_size,
                     config.num_key_value_heads, config.head_dim, dtype, device)
