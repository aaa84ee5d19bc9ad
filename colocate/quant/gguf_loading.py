"""A GGUF checkpoint's QuantConfig and state dict: as stored, dequantized, or requantized.

`quantization` for a GGUF:
    None     as stored: decoder linears that are all Q4_0 / Q4_1 load as int4 group 32,
             all Q8_0 as int8 group 32, exactly (no requantizing); any other mix is
             dequantized to the model dtype, and the load logs it
    "gguf"   as stored, strictly: a linear that cannot be kept native is an error
    "none"   everything dequantized to the model dtype
    "int8" / "int4"   requantized (round to nearest) from the dequantized weights
Embeddings and norms are always dequantized to the model dtype (Q8_0 and the float
types exactly), as for every other checkpoint. As stored on CPU, a tied Q8_0 embedding
is also kept as it is for the output head (QuantConfig.q8_lm_head): llama.cpp's own
head, and a decode step's largest single read (49,152 x 576 for SmolLM2: 32 MB as Q8_0,
113 MB in float32).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from colocate import progress
from colocate.model.gguf_file import GGUFFile, open_gguf
from colocate.model.checkpoint import LINEAR_PARTS, to_model_state_dict
from colocate.model.model_config import LlamaConfig
from colocate.quant import gguf
from colocate.quant.config import QuantConfig
from colocate.quant.linear import Int4Linear, Int8Linear
from colocate.quant.qtensors import concat_int4, concat_int8

log = logging.getLogger(__name__)

QUANTIZATIONS = (None, "gguf", "none", "int8", "int4")


def _linear_types(config: LlamaConfig, f: GGUFFile) -> dict[str, str]:
    """GGUF tensor name -> ggml type, for every decoder linear weight."""
    linears = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
    return {n: t.type_name for n, t in f.tensors.items()
            if n.startswith("blk.") and n.split(".")[2] in linears}


def stored_method(config: LlamaConfig, f: GGUFFile, strict: bool) -> str | None:
    """"int4" / "int8" when every decoder linear is of one native kind, else None."""
    types = _linear_types(config, f)
    kinds = set(types.values())
    if kinds and kinds <= set(gguf.NATIVE_INT4):
        return "int4"
    if kinds and kinds <= set(gguf.NATIVE_INT8):
        return "int8"
    if kinds and kinds <= set(gguf.FLOAT_TYPES):
        return None
    other = sorted((n, t) for n, t in types.items()
                   if t not in gguf.NATIVE_INT4 + gguf.NATIVE_INT8 + gguf.FLOAT_TYPES)
    name, kind = other[0] if other else sorted(types.items())[0]
    if strict:
        raise ValueError(f"{f.path}: tensor {name!r} is {kind}, which cannot be kept as "
                         f"stored (native: {', '.join(gguf.NATIVE_INT4 + gguf.NATIVE_INT8)}, "
                         f"all linears of one kind); use quantization None, 'none', 'int8' "
                         f"or 'int4'")
    log.info("%s: decoder linears are %s (e.g. %s), not one natively held kind: "
             "dequantizing them to the model dtype", f.path, "/".join(sorted(kinds)), name)
    return None


def stored_quantization(config: LlamaConfig, strict: bool = False
                        ) -> tuple[str | None, int | None]:
    """(method, group size) the linears keep as stored, from the header alone."""
    method = stored_method(config, open_gguf(config.gguf_file), strict)
    return (method, gguf.BLOCK) if method is not None else (None, None)


def gguf_quant_config(config: LlamaConfig, quantization: str | None, group_size: int | None,
                      device: str) -> QuantConfig | None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported for a GGUF; expected "
                         f"one of {list(QUANTIZATIONS)}")
    if quantization in ("int8", "int4"):
        return QuantConfig.for_device(quantization, group_size, device)
    if quantization == "none":
        return None
    method = stored_method(config, open_gguf(config.gguf_file), strict=quantization == "gguf")
    if method is not None and group_size not in (None, gguf.BLOCK):
        raise ValueError(f"quant_group_size={group_size} conflicts with the GGUF's blocks of "
                         f"{gguf.BLOCK}; leave it unset or requantize with quantization='int4'")
    if method is None:
        return None
    qc = QuantConfig.for_device(method, gguf.BLOCK, device, source="gguf")
    if stored_q8_head(config) and not str(device).startswith("cuda"):
        qc = dataclasses.replace(qc, q8_lm_head=True)
    return qc


def stored_q8_head(config: LlamaConfig) -> bool:
    """The output head is the embedding (tied) and that is stored as Q8_0: kept as stored
    on CPU (from the header alone)."""
    f = open_gguf(config.gguf_file)
    embed = f.tensors.get("token_embd.weight")
    return (config.tie_word_embeddings and "output.weight" not in f.tensors
            and embed is not None and embed.type_name in gguf.NATIVE_INT8)


def read_gguf_state(config: LlamaConfig, dtype: torch.dtype,
                    qc: QuantConfig | None) -> dict[str, torch.Tensor]:
    """The model state dict (the one build_model(config, qc, dtype) declares), read
    as one loading stage counting the GGUF's tensors and their stored bytes."""
    f = open_gguf(config.gguf_file)
    tensors = gguf.mapped_tensors(f, config)
    native = qc is not None and qc.source == "gguf"
    linears = {n for n in tensors if n.endswith("_proj.weight")} if native else set()
    with progress.stage("loading", total=len(tensors), unit="tensor") as bar:
        hf: dict[str, torch.Tensor] = {}
        for name, info in tensors.items():
            if name in linears:
                continue
            t = gguf.dequantized(info, str(f.path))                          # float32
            heads = gguf.rotary_heads(name, config)
            hf[name] = (t if heads is None else gguf.unpermute_rows(t, heads)).to(dtype)
            bar.advance(1, nbytes=info.data.nbytes)
        state = to_model_state_dict(hf)
        if native:
            _add_native_linears(state, tensors, config, dtype, qc, bar)
    if native and qc.q8_lm_head:
        head = gguf.int8_weight(tensors["model.embed_tokens.weight"])
        buffers = Int8Linear.buffers_for(head, dtype, qc.int8_layout)
        state.update({f"lm_head.{k}": v for k, v in buffers.items()})
    if qc is None or native:
        return state
    from colocate.quant.handler import quantize_state_dict

    return quantize_state_dict(state, qc, dtype)


def _add_native_linears(state: dict[str, torch.Tensor], tensors: dict, config: LlamaConfig,
                        dtype: torch.dtype, qc: QuantConfig, bar: progress.Stage) -> None:
    """The decoder linears as stored (int4 / int8 blocks), fused as the model uses them."""
    for layer in range(config.num_hidden_layers):
        base = f"model.layers.{layer}."
        for fused, parts in LINEAR_PARTS.items():
            infos = [tensors[f"{base}{p}.weight"] for p in parts]
            weights = [_native(info, f"{base}{p}.weight", config, qc)
                       for info, p in zip(infos, parts)]
            if qc.method == "int4":
                buffers = Int4Linear.buffers_for(concat_int4(weights), dtype, qc.layout,
                                                 act_order=False, exact_scales=True)
            else:
                buffers = Int8Linear.buffers_for(concat_int8(weights), dtype, qc.int8_layout)
            state.update({f"{base}{fused}.{k}": v for k, v in buffers.items()})
            bar.advance(len(parts), nbytes=sum(info.data.nbytes for info in infos))


def _native(info, hf: str, config: LlamaConfig, qc: QuantConfig):
    """One linear's blocks as Int4Weight / Int8Weight, q and k rows back in HF order."""
    w = gguf.int4_weight(info) if qc.method == "int4" else gguf.int8_weight(info)
    heads = gguf.rotary_heads(hf, config)
    if heads is None:
        return w
    # Every per-row tensor (integers, scales, zeros, mins) moves with its row.
    rows = {f.name: gguf.unpermute_rows(getattr(w, f.name), heads)
            for f in dataclasses.fields(w) if isinstance(getattr(w, f.name), torch.Tensor)}
    return dataclasses.replace(w, **rows)
