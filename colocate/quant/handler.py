"""Swap a model's decoder nn.Linear layers for weight-only quantized ones (gpt-fast style).

Two halves that must agree, both driven by one QuantConfig:
  - swap_linears(): the module structure, built on the meta device (no memory);
  - quantize_state_dict(): float linear weights -> the buffers those modules declare.
A model is then load_state_dict(..., assign=True)-ed, so each tensor exists once.
Embeddings and lm_head stay in the model dtype: they are a small share of a 13B model
and the logits are sensitive to them.
"""
from __future__ import annotations

import torch
from torch import nn

from colocate import progress
from colocate.quant.config import QuantConfig
from colocate.quant.linear import Int4Linear, Int8Linear
from colocate.quant.rtn import quantize_int4, quantize_int8
from colocate.quant.int4_layouts import TINYGEMM_DTYPE

# Module names (under model.layers.N.) of the linears that are quantized.
QUANTIZED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                     "mlp.down_proj")


def is_quantized_linear(module_name: str) -> bool:
    return module_name.startswith("model.layers.") and module_name.endswith(QUANTIZED_LINEARS)


def make_linear(qc: QuantConfig, in_features: int, out_features: int, bias: bool,
                dtype: torch.dtype) -> nn.Module:
    if qc.method == "int8":
        return Int8Linear(in_features, out_features, bias, dtype, qc.group_size,
                          qc.int8_layout)
    return Int4Linear(in_features, out_features, bias, dtype, qc.group_size, qc.layout,
                      qc.act_order, qc.exact_scales)


def swap_linears(model: nn.Module, qc: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """Replace every quantizable nn.Linear in place (on the current default device)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized_linear(name):
            parent_name, _, child = name.rpartition(".")
            new = make_linear(qc, module.in_features, module.out_features,
                              module.bias is not None, dtype)
            setattr(model.get_submodule(parent_name), child, new)
    return model


def quantize_weight(qc: QuantConfig, w: torch.Tensor,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One (N, K) float weight -> the buffers of its quantized module (round to nearest)."""
    if qc.method == "int8":
        return Int8Linear.buffers_for(quantize_int8(w, scale_dtype=dtype), dtype,
                                      qc.int8_layout)
    # The CPU op keeps scales in bf16: quantize against the bf16 scale it will use.
    scale_dtype = TINYGEMM_DTYPE if qc.layout == "tinygemm" else dtype
    return Int4Linear.buffers_for(quantize_int4(w, qc.group_size, scale_dtype), dtype,
                                  qc.layout, qc.act_order)


def quantize_state_dict(state: dict[str, torch.Tensor], qc: QuantConfig,
                        dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's float state dict -> the quantized model's, consuming `state` as it
    goes so each float weight is freed once quantized (the peak stays about one
    float copy plus the quantized one). Shown as a stage counting decoder layers: a
    layer counts once all its linears are quantized."""
    linears_left: dict[str, int] = {}           # "model.layers.N." -> linears still float
    for name in state:
        if name.endswith(".weight") and is_quantized_linear(name.removesuffix(".weight")):
            layer = _layer_of(name)
            linears_left[layer] = linears_left.get(layer, 0) + 1
    out: dict[str, torch.Tensor] = {}
    with progress.stage(f"quantizing {qc.method}", total=len(linears_left),
                        unit="layer") as bar:
        for name in list(state):
            t = state.pop(name)
            prefix = name.removesuffix(".weight")
            if name.endswith(".weight") and is_quantized_linear(prefix):
                for buf, v in quantize_weight(qc, t, dtype).items():
                    out[f"{prefix}.{buf}"] = v
                linears_left[_layer_of(name)] -= 1
                if linears_left[_layer_of(name)] == 0:
                    bar.advance(1)
            else:
                out[name] = t
    return out


def _layer_of(name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> 'model.layers.3.'"""
    return ".".join(name.split(".")[:3]) + "."
