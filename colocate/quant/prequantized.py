"""Load checkpoints published already quantized (AWQ, GPTQ) into the model's state dict.

config.json's `quantization_config` says which format; each HF linear's packed
tensors are unpacked to Int4Weight (awq.py, gptq.py), q/k/v and gate/up are
concatenated like the float loader fuses them, and the result is packed into the
device layout the model's Int4Linear modules declare. Everything else (embeddings,
norms, lm_head, biases) is read as in a float checkpoint and cast to the model dtype.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from colocate.model.checkpoint import LINEAR_PARTS, checkpoint_files, hf_tensor_shapes
from colocate.model.model_config import LlamaConfig
from colocate.quant import awq, gptq
from colocate.quant.config import QuantConfig
from colocate.quant.linear import Int4Linear
from colocate.quant.qtensors import Int4Weight, concat_int4

PACKED = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_quant_config(raw: dict[str, Any], quantization: str | None,
                            group_size: int | None, device: str) -> QuantConfig | None:
    """The QuantConfig of a model: from config.json's quantization_config when the
    checkpoint is pre-quantized (arguments may only agree with it), else from the
    arguments. ValueError names the setting that cannot be honoured."""
    if raw.get("gguf_file"):
        from colocate.quant.gguf_loading import gguf_quant_config

        return gguf_quant_config(LlamaConfig.from_dict(raw), quantization, group_size, device)
    if quantization == "none":             # "dequantize": an HF float checkpoint already is
        quantization = None
    qc = raw.get("quantization_config")
    if qc is None:
        return QuantConfig.for_device(quantization, group_size, device)
    method = qc.get("quant_method")
    if method not in ("awq", "gptq"):
        raise ValueError(f"config.json quantization_config.quant_method={method!r} is not "
                         "supported; expected 'awq' or 'gptq'")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"config.json quantization_config.bits={bits!r}: only 4-bit {method} "
                         "checkpoints are supported")
    ckpt_group = qc.get("group_size", qc.get("q_group_size"))
    if quantization not in (None, "int4"):
        raise ValueError(f"quantization={quantization!r} conflicts with the checkpoint's 4-bit "
                         f"{method} weights; use None or 'int4'")
    if group_size is not None and group_size != ckpt_group:
        raise ValueError(f"quant_group_size={group_size} conflicts with the checkpoint's "
                         f"group_size {ckpt_group}")
    act_order = False
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"config.json quantization_config.version={version!r}: only AWQ "
                             "'gemm' packing is supported")
        if qc.get("zero_point", True) is not True:
            raise ValueError("config.json quantization_config.zero_point=false: AWQ without "
                             "zero points is not supported")
    else:
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in gptq.FORMATS:
            raise ValueError(f"config.json quantization_config.checkpoint_format={fmt!r} is not "
                             f"supported; expected one of {sorted(gptq.FORMATS)}")
        act_order = bool(qc.get("desc_act", False))
    return QuantConfig.for_device("int4", ckpt_group, device, source=method, act_order=act_order)


def read_prequantized(path: Path, config: LlamaConfig, dtype: torch.dtype,
                      qc: QuantConfig) -> dict[str, torch.Tensor]:
    """The quantized model's state dict from an AWQ / GPTQ checkpoint directory."""
    shapes = hf_tensor_shapes(config)
    linears = {n.removesuffix(".weight") for n in shapes
               if n.endswith("_proj.weight") and n.startswith("model.layers.")}
    wanted = {n: s for n, s in shapes.items() if n.removesuffix(".weight") not in linears}
    plain: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                prefix, _, kind = name.rpartition(".")
                if name in wanted:
                    t = f.get_tensor(name)
                    if tuple(t.shape) != wanted[name]:
                        raise ValueError(f"{file.name}: tensor {name!r} has shape "
                                         f"{tuple(t.shape)}, expected {wanted[name]}")
                    plain[name] = t.to(dtype)
                elif prefix in linears and kind in PACKED:
                    packed.setdefault(prefix, {})[kind] = f.get_tensor(name)
    missing = [n for n in wanted if n not in plain]
    missing += [f"{p}.{k}" for p in sorted(linears) for k in PACKED[:3]
                if k not in packed.get(p, {})]
    if missing:
        raise ValueError(f"{path}: {qc.source} checkpoint is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    fmt = config.raw["quantization_config"].get("checkpoint_format", "gptq")
    state = {n: t for n, t in plain.items() if not n.endswith("_proj.bias")}
    for layer in range(config.num_hidden_layers):
        base = f"model.layers.{layer}."
        for fused, parts in LINEAR_PARTS.items():
            weights = [_unpack(qc, packed[base + p], shapes[f"{base}{p}.weight"],
                               gptq.FORMATS.get(fmt, 0)) for p in parts]
            buffers = Int4Linear.buffers_for(concat_int4(weights), dtype, qc.layout,
                                             qc.act_order)
            state.update({f"{base}{fused}.{k}": v for k, v in buffers.items()})
            biases = [plain.get(f"{base}{p}.bias") for p in parts]
            if all(b is not None for b in biases):
                state[f"{base}{fused}.bias"] = torch.cat(biases)
    return state


def _unpack(qc: QuantConfig, t: dict[str, torch.Tensor], weight_shape: tuple[int, int],
            zero_offset: int) -> Int4Weight:
    if qc.source == "awq":
        w = awq.to_int4(t["qweight"], t["qzeros"], t["scales"], qc.group_size)
    else:
        w = gptq.to_int4(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                         qc.group_size, zero_offset)
    if w.shape != tuple(weight_shape):
        raise ValueError(f"{qc.source} weight unpacks to (out, in) {w.shape}, config.json "
                         f"says {tuple(weight_shape)}")
    return w
