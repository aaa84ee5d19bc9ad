"""GGUF tensors -> our weights: ggml blocks decoded, names mapped, rotary rows restored.

ggml block types read natively (one block = 32 consecutive weights of a row):
    Q4_0  fp16 d, 16 bytes of nibbles        W = (q - 8) * d
    Q4_1  fp16 d, fp16 m, 16 bytes nibbles   W = q * d + m
    Q8_0  fp16 d, 32 int8                    W = q * d
Nibble order in a block: byte i holds weight i (low nibble) and weight i + 16 (high).
Q4_0 / Q4_1 become Int4Weight (group 32, `min` = m, or -8 d for Q4_0); Q8_0 becomes a
grouped Int8Weight. Both dequantize to exactly what `gguf.quants.dequantize` returns.
Every other type (K-quants, IQ, ...) is dequantized by the `gguf` package itself.

llama.cpp's converter permutes the rows of q and k so that its rotary embedding can
rotate adjacent pairs (x0, x1); ours rotates the two halves of each head (x_i,
x_{i + d/2}), as HF does. `unpermute_rows` puts the rows back.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from colocate.model.gguf_file import GGUFFile, TensorInfo
from colocate.model.checkpoint import hf_tensor_shapes
from colocate.model.model_config import LlamaConfig
from colocate.quant.qtensors import Int4Weight, Int8Weight

log = logging.getLogger(__name__)

BLOCK = 32
NATIVE_INT4 = ("Q4_0", "Q4_1")
NATIVE_INT8 = ("Q8_0",)
FLOAT_TYPES = ("F32", "F16", "BF16")

# GGUF name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Tensors llama.cpp may write that we recompute or do not use.
_IGNORED = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        mapped = _LAYER_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    mapped = _GLOBAL_NAMES.get(stem)
    return None if mapped is None else f"{mapped}.{kind}"


def unpermute_rows(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: within each head, rows (0, h/2, 1, h/2+1, ...)
    were interleaved; return them to (0, 1, ..., h/2 - 1, h/2, ...). Works on any
    tensor with one row per output channel (weights, scales, mins)."""
    rows = t.shape[0]
    half = rows // num_heads // 2
    return (t.reshape(num_heads, half, 2, *t.shape[1:]).transpose(1, 2)
            .reshape(rows, *t.shape[1:]))                                    # (N, ...)


# ---- block decoding ------------------------------------------------------------------

def _blocks(info: TensorInfo, block_bytes: int) -> torch.Tensor:
    """Raw data (N, K / 32 * block_bytes) uint8 -> (N, K / 32, block_bytes) uint8."""
    N, K = info.shape
    raw = torch.from_numpy(np.array(info.data))         # (N, row bytes), a writable copy
    return raw.view(N, K // BLOCK, block_bytes)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian -> (...) float32, exactly the fp16 value."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, G, 16) uint8 -> (N, G * 32) uint8: low nibbles are weights 0-15, high 16-31."""
    N = qs.shape[0]
    return torch.cat([qs & 15, qs >> 4], dim=-1).reshape(N, -1)


def int4_weight(info: TensorInfo) -> Int4Weight:
    """A Q4_0 / Q4_1 tensor as group-32 Int4Weight in GGUF's exact `min` form."""
    if info.type_name == "Q4_0":
        b = _blocks(info, 18)
        d, qs = _fp16(b[..., :2]), b[..., 2:]                                # (N, G), (N, G, 16)
        m = -8 * d                                                           # exact in float32
    else:
        b = _blocks(info, 20)
        d, m, qs = _fp16(b[..., :2]), _fp16(b[..., 2:4]), b[..., 4:]
    scale = d.clone()
    safe = torch.where(d != 0, d, torch.ones_like(d))
    zero = torch.where(d != 0, -m / safe, torch.zeros_like(d))               # (N, G)
    return Int4Weight(q=_nibbles(qs), scale=scale, zero=zero, group_size=BLOCK, min=m)


def int8_weight(info: TensorInfo) -> Int8Weight:
    """A Q8_0 tensor as Int8Weight with a float32 scale per group of 32."""
    b = _blocks(info, 34)
    d = _fp16(b[..., :2])                                                    # (N, G)
    q = b[..., 2:].contiguous().view(torch.int8).reshape(info.shape)        # (N, K)
    return Int8Weight(q=q, scale=d)


def dequantized(info: TensorInfo, source: str) -> torch.Tensor:
    """Any tensor type as float32, in torch shape."""
    if info.type_name in NATIVE_INT4:
        return int4_weight(info).dequantize()
    if info.type_name in NATIVE_INT8:
        return int8_weight(info).dequantize()
    if info.type_name in FLOAT_TYPES:
        return torch.from_numpy(np.array(_float_array(info))).float().reshape(info.shape)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    log.info("%s: tensor %s is %s, dequantized to float at load", source, info.name,
             info.type_name)
    values = dequantize(info.data, GGMLQuantizationType[info.type_name])
    return torch.from_numpy(np.array(values)).float().reshape(info.shape)


def _float_array(info: TensorInfo) -> np.ndarray:
    if info.type_name == "BF16":                    # gguf hands bf16 over as raw uint8
        bits = np.ascontiguousarray(info.data).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return info.data


# ---- the whole file ------------------------------------------------------------------

def mapped_tensors(f: GGUFFile, config: LlamaConfig) -> dict[str, TensorInfo]:
    """HF name -> GGUF tensor, every expected one present with the shape the metadata
    implies; ValueError names the file and the tensor."""
    shapes = hf_tensor_shapes(config)
    out: dict[str, TensorInfo] = {}
    for name, info in f.tensors.items():
        if name in _IGNORED:
            raise ValueError(f"{f.path}: tensor {name!r} (llama3-style rope frequencies) is "
                             "not supported")
        hf = hf_name(name)
        if hf is None or hf not in shapes:
            raise ValueError(f"{f.path}: tensor {name!r} is not part of a "
                             f"{config.num_hidden_layers}-layer llama model")
        if tuple(info.shape) != shapes[hf]:
            raise ValueError(f"{f.path}: tensor {name!r} has shape {tuple(info.shape)}, "
                             f"expected {shapes[hf]} from the metadata")
        out[hf] = info
    missing = [n for n in shapes if n not in out]
    if missing:
        raise ValueError(f"{f.path}: GGUF is missing the tensor for {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out


def rotary_heads(hf: str, config: LlamaConfig) -> int | None:
    """How many heads' rows llama.cpp permuted in this tensor (None: not permuted)."""
    if hf.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if hf.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None
