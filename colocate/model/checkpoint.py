"""Read an HF LLaMA checkpoint (config.json + safetensors, single or sharded): its
files, the tensor shapes its config implies, the tensors themselves checked against
those shapes and cast, and the mapping onto the model's own (fused) parameter names
(q/k/v -> qkv_proj, gate/up -> gate_up_proj). The model itself is assembled by
colocate/quant/loading.py (load_model), which also handles quantized checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from colocate import progress
from colocate.model.model_config import MODEL_DTYPES, LlamaConfig

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}

# model parameter suffix -> the HF tensors concatenated (along dim 0) to make it
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
# model linear -> the HF linears it is made of (unfused ones map to themselves)
LINEAR_PARTS = {**FUSED, "self_attn.o_proj": ("self_attn.o_proj",),
                "mlp.down_proj": ("mlp.down_proj",)}


def parse_dtype(dtype: str | torch.dtype, config: LlamaConfig | None = None) -> torch.dtype:
    """A torch dtype from "float32" / "bfloat16" / "float16", or "auto": config.json's torch_dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; expected one of {sorted(DTYPES)}")
        return dtype
    if dtype == "auto" and config is not None:
        dtype = config.torch_dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the single file or the index's shards."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards = [path / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"{shard}: shard listed in {index.name} is missing")
        return shards
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json in the model directory")


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config must hold, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    per_layer = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,)})
    if config.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,),
                          "mlp.down_proj.bias": (h,)})
    for n in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{n}.{k}": s for k, s in per_layer.items()})
    return shapes


def read_hf_tensors(path: Path, config: LlamaConfig, dtype: torch.dtype,
                    device: str | torch.device) -> dict[str, torch.Tensor]:
    """The expected HF tensors, shape-checked and cast; unexpected extras are ignored.
    Shown as a loading stage counting tensors (and the bytes read) over every shard."""
    expected = hf_tensor_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    with progress.stage("loading", total=len(expected), unit="tensor") as bar:
        for file in checkpoint_files(path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        continue        # e.g. rotary_emb.inv_freq, recomputed from the config
                    t = f.get_tensor(name)
                    if tuple(t.shape) != expected[name]:
                        raise ValueError(f"{file.name}: tensor {name!r} has shape "
                                         f"{tuple(t.shape)}, expected {expected[name]} "
                                         f"from config.json")
                    tensors[name] = t.to(device=device, dtype=dtype)
                    bar.advance(1, nbytes=t.nbytes)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{path}: checkpoint is missing tensor {missing[0]!r}{more}")
    return tensors


def to_model_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF tensors to the model's parameters, concatenating the fused projections."""
    out = dict(hf)
    for name in [n for n in hf if n.startswith("model.layers.")]:
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                if name.endswith(f".{parts[0]}.{kind}"):
                    prefix = name[: -len(f"{parts[0]}.{kind}")]
                    pieces = [out.pop(f"{prefix}{p}.{kind}") for p in parts]
                    out[f"{prefix}{fused}.{kind}"] = torch.cat(pieces, dim=0)
    return out
