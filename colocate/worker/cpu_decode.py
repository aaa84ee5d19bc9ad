"""The CPU decode step as one C call (kernels/cpu/decode_step.c), planned once per model.

A batch where every sequence adds one token, on a float32 model whose decoder linears
are float32 or block-dot kernels' weights (int4 "blocks", or int8 with float32 scales;
what a GGUF loads as stored) and whose KV cache is float32: the whole layer stack runs in C,
so a step costs its matrix products and not hundreds of small torch ops (see the C
file for the measurement). The embedding, the final norm and the output head stay in
torch: each is one op per step.

The plan holds every weight's address in ctypes structures built once, the first time
a decode step meets the model (weights are final by then, and they live as long as the
model: the plan keeps references to them). Anything it does not cover returns None
from `build` or False from `covers`, and the caller keeps the torch path: the two
compute the same function (tests/quant/test_cpu_decode_step.py holds them together).

`COLOCATE_CPU_DECODE=torch` keeps the torch path everywhere.
"""
from __future__ import annotations

import ctypes
import os

import torch

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.kv_cache import LayerKVCache
from colocate.model.llama import LlamaForCausalLM
from colocate.quant import block_kernels, cpu_ops
from colocate.quant.linear import Int4Linear, Int8Linear

DECODE_ENV = "COLOCATE_CPU_DECODE"     # "c" (the default where the kernels build) | "torch"

_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class _QLinear(ctypes.Structure):
    _fields_ = [("bits", _I64), ("q", _P), ("scale", _P), ("mins", _P),
                ("N", _I64), ("K", _I64), ("group", _I64), ("half", _I64)]


class _DecoderLayer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("qkv", _QLinear), ("o", _QLinear),
                ("gate_up", _QLinear), ("down", _QLinear), ("key_cache", _P),
                ("value_cache", _P)]


class _DecodeModel(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("intermediate", _I64), ("num_layers", _I64), ("block_size", _I64),
                ("eps", _F64), ("scale", _F64), ("cos_sin", _P), ("layers", _P)]


def enabled() -> bool:
    choice = os.environ.get(DECODE_ENV, "c")
    if choice not in ("c", "torch"):
        raise ValueError(f"{DECODE_ENV}={choice!r}: expected 'c' or 'torch'")
    return choice == "c" and block_kernels.available()


def _qlinear(module) -> tuple[_QLinear, list[torch.Tensor]] | None:
    """The C view of one linear, and the tensors it points into; None if not covered."""
    if getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, torch.nn.Linear):
        held, bits = [module.weight], 32
    elif not cpu_ops.block_kernels_on():        # COLOCATE_CPU_MATMUL=torch: torch's ops
        return None
    elif isinstance(module, Int4Linear) and module.layout == "blocks" and module.perm is None:
        held, bits = [module.qweight, module.scale, module.min], 4
    elif (isinstance(module, Int8Linear) and module.layout == "x16"
          and module.scale.dtype == torch.float32):
        held, bits = [module.qweight, module.scale], 8
    else:
        return None
    if any(t.device.type != "cpu" or not t.is_contiguous() for t in held):
        return None
    N, K = module.out_features, module.in_features
    if bits == 32:
        ok = held[0].dtype == torch.float32
        return (_QLinear(32, held[0].data_ptr(), None, None, N, K, K, 0), held) if ok else None
    groups = held[1].numel() // N
    if K % block_kernels.BLOCK or (K // groups) % block_kernels.BLOCK:
        return None
    mins = held[2].data_ptr() if bits == 4 else None
    half = bits == 4 and block_kernels.half_scales(held[1], held[2])
    return _QLinear(bits, held[0].data_ptr(), held[1].data_ptr(), mins, N, K, K // groups,
                    half), held


class CpuDecodePlan:
    """The model's layer stack as decode_step.c sees it (caches bound per call)."""

    def __init__(self, model, layers: list[_DecoderLayer], held: list[torch.Tensor]) -> None:
        cfg = model.config
        self.model = model
        self.layers = (_DecoderLayer * len(layers))(*layers)
        self.held = held                            # keeps every pointed-to tensor alive
        self.cos_sin = model.rotary.cos_sin         # (max_pos, 2, hd) float32
        self.struct = _DecodeModel(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.num_hidden_layers, 0, cfg.rms_norm_eps,
            cfg.head_dim ** -0.5, self.cos_sin.data_ptr(), ctypes.addressof(self.layers))
        self._bound: tuple[int, ...] = ()
        self.work = torch.empty(0, dtype=torch.uint8)   # the step's scratch, grown on demand

    @classmethod
    def build(cls, model) -> "CpuDecodePlan | None":
        if (not enabled() or not isinstance(model, LlamaForCausalLM)
                or model.rotary.cos_sin.dtype != torch.float32
                or model.rotary.cos_sin.device.type != "cpu"):
            return None
        layers, held = [], []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            views = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                           mlp.down_proj)]
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if None in views or any(n.dtype != torch.float32 for n in norms):
                return None
            for _, tensors in views:
                held.extend(tensors)
            held.extend(norms)
            layers.append(_DecoderLayer(norms[0].data_ptr(), norms[1].data_ptr(),
                                        *(v for v, _ in views), None, None))
        return cls(model, layers, held)

    @staticmethod
    def covers_cache(kv_caches: list[LayerKVCache]) -> bool:
        """Whether the C step reads and writes this cache (float32, on the CPU)."""
        first = kv_caches[0]
        return (not first.quantized and first.key.dtype == torch.float32
                and first.key.device.type == "cpu")

    def _bind(self, kv_caches: list[LayerKVCache], block_size: int) -> None:
        """Point the layers at this forward's caches (they change only on a new cache)."""
        key = (block_size, *(c.key.data_ptr() for c in kv_caches))
        if key == self._bound:
            return
        for layer, cache in zip(self.layers, kv_caches):
            layer.key_cache, layer.value_cache = cache.key.data_ptr(), cache.value.data_ptr()
        self.struct.block_size = block_size
        self._bound = key

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[LayerKVCache], meta: AttentionMetadata) -> torch.Tensor:
        """The model's forward for an all-decode batch: (S,) ids -> (S, hidden), normed."""
        longest = int(positions.max()) + 1              # the longest sequence's length
        if longest > self.cos_sin.shape[0]:
            raise ValueError("a position is past the model's max_position_embeddings")
        self._bind(kv_caches, meta.block_size)
        inner = self.model.model
        h = inner.embed_tokens(input_ids).float().contiguous()               # (S, H)
        model = ctypes.addressof(self.struct)
        need = block_kernels.decode_step_workspace(model, h.shape[0], longest)
        if need > self.work.numel():
            self.work = torch.empty(need, dtype=torch.uint8)
        rc = block_kernels.decode_step(
            model, h.shape[0], positions.to(torch.int64).contiguous(),
            meta.slot_mapping.to(torch.int64).contiguous(),
            meta.block_tables.to(torch.int64).contiguous(), h, self.work)
        if rc != 0:            # the size asked just above: a mismatch is a bug, not input
            raise RuntimeError(f"decode_step: workspace of {self.work.numel()} bytes refused")
        return inner.norm(h)                                                 # (S, H)
