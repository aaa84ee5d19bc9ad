"""The paged KV cache of one layer, and int8 KV quantization.

A layer's cache is a key and a value tensor (num_blocks, block_size, nkv, hd) in the
model dtype, or, with kv_cache_dtype="int8", int8 tensors of that shape plus one fp32
scale per token per KV head beside them, (num_blocks, block_size, nkv). The scale
width matches the memory planner (colocate.memory.sizing.KV_INT8_SCALE_BYTES).

Quantization is symmetric absmax over a head's vector: scale = max|x| / 127 and
q = floor(x * 127 / max|x| + 0.5), so every value dequantizes to within scale / 2.
`quantize_kv` is the definition; the Triton reshape-and-cache kernel follows it
operation for operation, and the kernel tests compare against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from colocate.model.model_config import KV_CACHE_DTYPES

KV_SCALE_DTYPE = torch.float32
_QMAX = 127.0
_AMAX_FLOOR = 1e-30


@dataclass
class LayerKVCache:
    key: torch.Tensor                        # (num_blocks, block_size, nkv, hd)
    value: torch.Tensor                      # (num_blocks, block_size, nkv, hd)
    key_scale: torch.Tensor | None = None    # (num_blocks, block_size, nkv) fp32 when int8
    value_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.key_scale is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.key, self.value, self.key_scale, self.value_scale)
                   if t is not None)


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype,
                           device: torch.device | str = "cpu") -> torch.dtype:
    """The storage dtype for `kv_cache_dtype`, or a ValueError naming the argument.

    Called at load time so a bad value or a device that cannot run the int8 path fails
    before any weights or caches are allocated.
    """
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return model_dtype
    device = torch.device(device)
    # int8 KV runs on the CPU torch ops path and on the CUDA Triton kernels; nothing else.
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"kv_cache_dtype='int8' is not supported on device {device}")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("kv_cache_dtype='int8' on CUDA needs the Triton kernels, "
                             "and triton is not importable") from e
    return torch.int8


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> list[LayerKVCache]:
    """Zeroed caches per layer; `dtype` torch.int8 adds the fp32 scale tensors.

    Zeroed rather than empty: padded positions are masked out of attention, but
    masked weights are exact zeros only if the values they multiply are finite.
    """
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    quantized = dtype == torch.int8

    def scales() -> torch.Tensor | None:
        return (torch.zeros(shape[:3], dtype=KV_SCALE_DTYPE, device=device)
                if quantized else None)

    return [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                         torch.zeros(shape, dtype=dtype, device=device), scales(), scales())
            for _ in range(num_layers)]


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., hd) float -> int8 (..., hd) and fp32 scales (...), absmax over the last dim."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)                                           # (...)
    # An all-zero vector gets scale 0 and codes 0, not 0/0. The clamp keeps the unused
    # branch finite; the kernel computes the same expression with the same floor.
    inv = torch.where(amax > 0, _QMAX / amax.clamp(min=_AMAX_FLOOR), torch.zeros_like(amax))
    q = torch.floor(xf * inv.unsqueeze(-1) + 0.5).clamp_(-_QMAX, _QMAX)
    return q.to(torch.int8), amax / _QMAX


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 (..., hd) with scales (...) -> `dtype` (..., hd)."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)
