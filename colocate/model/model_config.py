"""LlamaConfig: the model shape read from an HF config.json, and the sizes it implies.

Everything that needs only the config (the memory plan, KV sizing) comes from here,
so `colocate plan` can size a 13B deployment without its weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# The dtypes a model computes in (config.json's torch_dtype names), and the bytes of
# one element of each dtype weights or KV may be stored in.
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
# KV cache formats: "auto" keeps K/V in the model dtype, "int8" quantizes them
# (colocate/model/kv_cache.py).
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    torch_dtype: str = "float32"
    architecture: str = "LlamaForCausalLM"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architectures={archs!r} is not supported; "
                f"expected one of {SUPPORTED_ARCHITECTURES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"{source}: missing required field {key!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", 10000.0),
            rope_scaling=d.get("rope_scaling"),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            architecture=arch,
            raw=d,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LlamaConfig":
        """From a checkpoint directory's config.json, or from a GGUF file's metadata."""
        path = Path(path)
        if path.is_file():
            from colocate.model.gguf_file import llama_config_dict, open_gguf

            f = open_gguf(path)       # a file that is not GGUF fails here, saying what is accepted
            return cls.from_dict(llama_config_dict(f), source=str(path))
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: no config.json in the model directory")
        with open(cfg_path) as f:
            return cls.from_dict(json.load(f), source=str(cfg_path))

    @property
    def gguf_file(self) -> str | None:
        """The GGUF file this config was read from, None for an HF checkpoint."""
        return self.raw.get("gguf_file")

    # ---- sizes -------------------------------------------------------------
    def linear_parameters_per_layer(self) -> int:
        """Parameters of the quantizable linears of one decoder layer."""
        h, kvh, hd = self.hidden_size, self.num_key_value_heads, self.head_dim
        q = h * self.num_attention_heads * hd
        kv = 2 * h * kvh * hd
        o = self.num_attention_heads * hd * h
        mlp = 3 * h * self.intermediate_size
        return q + kv + o + mlp

    def embedding_parameters(self) -> int:
        """Input embedding plus lm_head (once when tied)."""
        n = self.vocab_size * self.hidden_size
        return n if self.tie_word_embeddings else 2 * n

    def norm_parameters(self) -> int:
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    def num_parameters(self) -> int:
        return (self.num_hidden_layers * self.linear_parameters_per_layer()
                + self.embedding_parameters() + self.norm_parameters())

    def kv_bytes_per_token(self, kv_dtype_bytes: int) -> int:
        """K and V of one token over all layers, without any quantization scales."""
        return (2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
                * kv_dtype_bytes)

    def linear_shapes_per_layer(self) -> tuple[tuple[int, int], ...]:
        """(in_features, out_features) of q, k, v, o, gate, up, down in one layer.

        Quantized sizes depend on the shape, not only the count: int8 keeps a scale
        per output channel and int4 one per group of in_features.
        """
        h, ffn = self.hidden_size, self.intermediate_size
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return ((h, q_out), (h, kv_out), (h, kv_out), (q_out, h),
                (h, ffn), (h, ffn), (ffn, h))
