"""Argument checks shared by the kernel launchers.

A Triton kernel trusts every pointer and stride it is given; a wrong shape reads
someone else's memory instead of raising. So each launcher checks its arguments here
first and raises ValueError naming the argument.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device, which Triton can run on; returns it."""
    named = {n: t for n, t in tensors.items() if t is not None}
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    device = first.device
    # The interpreter runs on CPU tensors; compiled kernels need CUDA ones.
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"{first_name} is on {device}: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 for CPU tensors)")
    return device


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(name: str, t: torch.Tensor, shape: tuple[int | None, ...],
                 dtypes: tuple[torch.dtype, ...], contiguous_last: bool = True) -> None:
    """Rank, sizes (None: any), dtype and a unit stride in the last dimension."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(w is not None and s != w for s, w in zip(t.shape, shape)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if contiguous_last and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, "
                         f"got strides {t.stride()}")


def check_same_layout(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """The kernels index a pair (key and value, or their scales) with one set of strides."""
    if t.shape != ref.shape or t.stride() != ref.stride() or t.dtype != ref.dtype:
        raise ValueError(f"{name} must match {ref_name} in shape, strides and dtype: "
                         f"{tuple(t.shape)}/{t.stride()}/{t.dtype} vs "
                         f"{tuple(ref.shape)}/{ref.stride()}/{ref.dtype}")


def check_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor,
                   key_scale: torch.Tensor | None, value_scale: torch.Tensor | None,
                   num_kv_heads: int | None, head_dim: int | None) -> bool:
    """Paged cache (num_blocks, block_size, nkv, hd), float or int8 with fp32 scales
    (num_blocks, block_size, nkv). Returns True when the cache is int8."""
    check_tensor("key_cache", key_cache, (None, None, num_kv_heads, head_dim),
                 FLOAT_DTYPES + (torch.int8,))
    check_same_layout("value_cache", value_cache, "key_cache", key_cache)
    quantized = key_cache.dtype == torch.int8
    if quantized != (key_scale is not None) or quantized != (value_scale is not None):
        raise ValueError("key_scale and value_scale must be given exactly when the cache is "
                         f"int8 (key_cache is {key_cache.dtype})")
    if quantized:
        check_tensor("key_scale", key_scale, tuple(key_cache.shape[:3]), (torch.float32,))
        check_same_layout("value_scale", value_scale, "key_scale", key_scale)
    return quantized


def check_queries_against_cache(q: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, key_scale: torch.Tensor | None,
                                value_scale: torch.Tensor | None) -> bool:
    """q (tokens, nh, hd) against a paged cache: a float cache must share q's dtype and
    the query heads must split evenly over the KV heads (GQA). True when int8."""
    check_tensor("q", q, (None, None, None), FLOAT_DTYPES)
    nh, hd = q.shape[1], q.shape[2]
    quant = check_kv_cache(key_cache, value_cache, key_scale, value_scale, None, hd)
    nkv = key_cache.shape[2]
    if not quant and key_cache.dtype != q.dtype:
        raise ValueError(f"key_cache dtype {key_cache.dtype} must equal q dtype {q.dtype} "
                         "(or be int8)")
    if nkv == 0 or nh % nkv:
        raise ValueError(f"q has {nh} heads, not a multiple of key_cache's {nkv} KV heads")
    return quant


def next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << max(0, n - 1).bit_length())
