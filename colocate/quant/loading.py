"""The quantization-aware half of loading a model: which state dict, which modules.

Shared by model/loader.py (a model per process) and memory/weight_store.py (one
published copy per device), so both build exactly the same module structure.
"""
from __future__ import annotations

from pathlib import Path

import torch

from colocate.model.llama import LlamaForCausalLM
from colocate.model.loader import read_hf_tensors, to_model_state_dict
from colocate.model.model_config import LlamaConfig
from colocate.quant.config import QuantConfig
from colocate.quant.handler import quantize_state_dict, swap_linears
from colocate.quant.prequantized import checkpoint_quant_config, read_prequantized

__all__ = ["build_model", "checkpoint_quant_config", "read_model_state"]


def read_model_state(path: Path, config: LlamaConfig, dtype: torch.dtype,
                     device: str | torch.device, qc: QuantConfig | None,
                     read_float=read_hf_tensors) -> dict[str, torch.Tensor]:
    """The state dict of the model build_model() makes: float, quantized at load, or
    unpacked from an AWQ / GPTQ checkpoint. `read_float` lets a caller substitute the
    float reader (the weight store's tests count reads through it)."""
    if config.gguf_file:
        from colocate.quant.gguf_loading import read_gguf_state

        return {k: v.to(device) for k, v in read_gguf_state(config, dtype, qc).items()}
    if qc is not None and qc.source != "rtn":
        return {k: v.to(device) for k, v in read_prequantized(path, config, dtype, qc).items()}
    state = to_model_state_dict(read_float(path, config, dtype, device))
    return state if qc is None else quantize_state_dict(state, qc, dtype)


def build_model(config: LlamaConfig, qc: QuantConfig | None,
                dtype: torch.dtype) -> LlamaForCausalLM:
    """The model on the meta device, its decoder linears swapped when quantized."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        if qc is not None:
            swap_linears(model, qc, dtype)
    return model
