"""Loading a model, quantization-aware: which state dict, which modules, and
load_model, which puts them together.

read_model_state and build_model are shared by load_model (a model per process) and
memory/weight_store.py (one published copy per device), so both build exactly the
same module structure. The checkpoint files themselves are read by
colocate/model/checkpoint.py, below this package.
"""
from __future__ import annotations

from pathlib import Path

import torch

from colocate.model.llama import LlamaForCausalLM
from colocate.model.checkpoint import parse_dtype, read_hf_tensors, to_model_state_dict
from colocate.model.model_config import LlamaConfig
from colocate.quant.config import QuantConfig
from colocate.quant.handler import quantize_state_dict, swap_linears
from colocate import cpu_features
from colocate.quant import cpu_ops
from colocate.quant.linear import Int4Linear, Int8Linear
from colocate.quant.prequantized import checkpoint_quant_config, read_prequantized

__all__ = ["build_model", "checkpoint_quant_config", "load_model", "read_model_state"]


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
            if qc.q8_lm_head:
                model.lm_head = Int8Linear(config.hidden_size, config.vocab_size, False, dtype,
                                           group_size=32, layout=qc.int8_layout)
    return model


def load_model(path: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", quantization: str | None = None,
               quant_group_size: int | None = None) -> LlamaForCausalLM:
    """Read a checkpoint (an HF directory, AWQ / GPTQ included, or a .gguf file) into an
    eval-mode model, built on the meta device and loaded with assign: no random init.

    quantization None | "int8" | "int4" (group size `quant_group_size`, default 128)
    quantizes the decoder linears at load (colocate/quant); a pre-quantized AWQ / GPTQ
    checkpoint is recognised from config.json and loaded as int4 either way.

    Raises FileNotFoundError for a missing config / weights file / shard and ValueError,
    naming the tensor or field, for a missing tensor, a shape mismatch, an unsupported
    architecture or rope type, a dtype other than float32 / bfloat16 / float16 / auto,
    or a quantization setting that cannot be honoured.
    """
    path = Path(path)
    if dtype != "auto":
        parse_dtype(dtype)          # a bad dtype string fails before any file is read
    config = LlamaConfig.from_pretrained(path)
    torch_dtype = parse_dtype(dtype, config)
    qc = checkpoint_quant_config(config.raw, quantization, quant_group_size, str(device))
    state = read_model_state(path, config, torch_dtype, device, qc)
    return model_over_state_dict(config, state, torch_dtype, device, qc)


def model_over_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor],
                          dtype: torch.dtype, device: str | torch.device,
                          qc: QuantConfig | None = None) -> LlamaForCausalLM:
    """Build on the meta device (with the quantized linears `qc` asks for), then make
    `state`'s tensors the parameters and buffers themselves: every model is made here,
    loaded from a file or attached to the weight store's shared copy."""
    model = build_model(config, qc, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary.rebuild(device, dtype)         # the rope table is per process and small
    _match_prefill_attention(model, device, dtype)
    return model.eval()


def _match_prefill_attention(model: LlamaForCausalLM, device, dtype: torch.dtype) -> None:
    """A CPU model whose linears prefill through the block kernels' dequantized products
    (cpu_ops) computes its prefill attention in their dtype too: bfloat16 where the CPU
    has bf16 units, so a prefill there is HF's bf16 computation throughout (attention was
    40% of a 512-token SmolLM2 prefill in float32 on an AMX Xeon), unless torch's bf16
    attention cannot run here (cpu_features.native_bf16_attention)."""
    prefill = cpu_features.prefill_attention_dtype()
    first = model.model.layers[0].self_attn.qkv_proj
    if (torch.device(device).type != "cpu" or prefill == dtype
            or not cpu_ops.block_kernels_on() or not isinstance(first, (Int4Linear, Int8Linear))):
        return
    for layer in model.model.layers:
        layer.self_attn.prefill_dtype = prefill
