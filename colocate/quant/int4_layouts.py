"""The three ways an int4 linear's integers, scales and zeros sit in memory.

A layout is what the matmul of one device reads directly; the weight store shares the
packed buffers as they are, so a service never repacks (that would be a private copy
per process). Both layouts hold the integers of Int4Weight, two per byte.

"kn" (CUDA, kernels/w4a16_matmul.py): qweight (K/2, N) uint8, row r holding input
    channels 2r (low nibble) and 2r+1 (high nibble), N contiguous so a tile of
    output columns is one coalesced load; scale and zero (K/g, N) in the model dtype;
    W = (q - zero) * scale.
"tinygemm" (CPU, torch.ops.aten._weight_int4pack_mm_for_cpu): qweight (N, K/2) uint8
    in the order _convert_weight_to_int4pack_for_cpu writes; scale_zero (K/g, N, 2)
    bfloat16, the op's own convention W = (q - 8) * scale + offset, so we store
    offset = (8 - zero) * scale. Rounding offset (and a scale that is not already
    bf16) to bf16 moves a weight by at most 16 * 2^-9 (3%) of its group's scale, the
    quantization step, whose own rounding error is up to 50% of it; our RTN keeps
    scales in bf16 for this layout, which halves that to 1.6%.
"blocks" (CPU, kernels/cpu/block_dot.c through quant/block_kernels.py): blocks of 32
    inputs in tiles of 16 output rows (N a multiple of 16), the "x16" order block_dot.c
    documents: qweight (N, K/2) uint8 bytes, tile t's block b in 256 bytes, 4 chunks of
    4 inputs x 16 rows, each byte holding inputs i (low nibble) and i + 16 (high) of a
    block as GGUF's Q4_0/Q4_1 pair them; scale and min (N, G) float32 elements in the
    same tile order, W = q * scale + min; a zero point becomes min = -zero * scale
    (exact in float32 for fp16/bf16 scales). A GGUF's scales and mins (exact_scales)
    stay float16, as stored.
"""
from __future__ import annotations

import functools

import torch

from colocate.quant.qtensors import Int4Weight
from colocate.quant.row_tiles import TILE, check_tiles, tiled, untiled

Buffers = dict[str, torch.Tensor]


# ---- kn ------------------------------------------------------------------------------

def pack_kn(w: Int4Weight, dtype: torch.dtype, exact_scales: bool = False) -> Buffers:
    """exact_scales is not honoured: kn keeps scale and zero in the model dtype, and a
    GGUF's min form becomes zero = -min / scale (within rounding, not bit for bit)."""
    q = w.q.t()                                                              # (K, N)
    qweight = (q[0::2] | (q[1::2] << 4)).contiguous()                        # (K/2, N)
    return {"qweight": qweight, "scale": w.scale.t().to(dtype).contiguous(),  # (G, N)
            "zero": w.zero.t().to(dtype).contiguous()}


def unpack_kn(buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q (N, K) uint8, scale (N, G) float32, zero (N, G) float32."""
    p = buffers["qweight"]                                                   # (K/2, N)
    q = torch.stack([p & 15, p >> 4], dim=1).view(-1, p.shape[1]).t()        # (N, K)
    return q, buffers["scale"].float().t(), buffers["zero"].float().t()


def empty_kn(N: int, K: int, group_size: int, dtype: torch.dtype,
             exact_scales: bool = False) -> Buffers:
    G = K // group_size
    return {"qweight": torch.empty(K // 2, N, dtype=torch.uint8),
            "scale": torch.empty(G, N, dtype=dtype), "zero": torch.empty(G, N, dtype=dtype)}


# ---- tinygemm ------------------------------------------------------------------------

TINYGEMM_DTYPE = torch.bfloat16


def pack_tinygemm(w: Int4Weight, dtype: torch.dtype, exact_scales: bool = False) -> Buffers:
    """`dtype` is unused: the CPU op wants its scales in the activation dtype, bf16.
    exact_scales keeps scale_zero in float32 instead, to hold a GGUF's fp16 scales and
    mins exactly as stored (cpu_ops.int4_mm rounds them to bf16 per call)."""
    N, K = w.q.shape
    if N % 16:
        raise ValueError(f"int4 on CPU needs out_features divisible by 16, got {N}")
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        w.q.to(torch.int32).contiguous(), 1)                                 # (N, K/2) uint8
    if w.min is not None:
        # GGUF's W = q * s + m is (q - 8) * s + (m + 8 s); in float32 8 s and the sum are
        # exact for fp16 s and m, so the op reproduces llama.cpp's weights bit for bit.
        offset = w.min.float() + 8 * w.scale.float()                         # (N, G)
    else:
        offset = (8 - w.zero.float()) * w.scale.float()                      # (N, G)
    scale_zero = torch.stack([w.scale.float().t(), offset.t()], dim=-1)      # (G, N, 2)
    scale_dtype = torch.float32 if exact_scales else TINYGEMM_DTYPE
    return {"qweight": qweight, "scale_zero": scale_zero.to(scale_dtype).contiguous()}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A uint8 buffer -> its nibbles in memory order, low nibble of each byte first."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=1).view(-1)


@functools.lru_cache(maxsize=8)
def _tinygemm_order(N: int, K: int, capability: str) -> torch.Tensor:
    """(N, K) -> flat nibble index in the packed buffer, as the CPU op lays it out here.

    torch writes a different order under each ATen CPU capability (DEFAULT, AVX2 and
    AVX512 all differ), so the order is asked of torch rather than written down: pack
    probe matrices whose entries are the base-16 digits of each entry's position, read
    the digits back out of every nibble, and invert. ceil(log2(N*K) / 4) packs of the
    real shape, once per shape and process; only dequantize() needs it (the matmul
    reads the packed buffer as it is). `capability` is the cache key: the layout can
    differ between processes, never within one.
    """
    count = N * K
    position = torch.arange(count, dtype=torch.int64)                        # (N*K,)
    held = torch.zeros(count, dtype=torch.int64)                             # position per nibble
    for shift in range(0, max(count - 1, 1).bit_length(), 4):
        digit = ((position >> shift) & 15).to(torch.int32).view(N, K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)
        held |= _nibbles(packed).to(torch.int64) << shift
    order = torch.full((count,), -1, dtype=torch.int64)
    order[held] = torch.arange(count)
    if (order < 0).any():
        raise RuntimeError(f"torch's int4 CPU packing of a {N}x{K} weight is not a "
                           "permutation of its nibbles; this layout cannot be read back")
    return order.view(N, K)                                                  # (N, K)


def unpack_tinygemm(buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q (N, K) uint8, scale (N, G) float32, offset (N, G) float32 (the float zero)."""
    p = buffers["qweight"]
    N, K = p.shape[0], p.shape[1] * 2
    capability = torch.backends.cpu.get_cpu_capability()
    q = _nibbles(p)[_tinygemm_order(N, K, capability)]                       # (N, K)
    sz = buffers["scale_zero"].float()                                       # (G, N, 2)
    return q, sz[..., 0].t(), sz[..., 1].t()


def empty_tinygemm(N: int, K: int, group_size: int, dtype: torch.dtype,
                   exact_scales: bool = False) -> Buffers:
    scale_dtype = torch.float32 if exact_scales else TINYGEMM_DTYPE
    return {"qweight": torch.empty(N, K // 2, dtype=torch.uint8),
            "scale_zero": torch.empty(K // group_size, N, 2, dtype=scale_dtype)}


# ---- blocks -------------------------------------------------------------------------

BLOCK = 32


def _check_blocks(N: int, K: int, group_size: int) -> None:
    if K % BLOCK or group_size % BLOCK:
        raise ValueError(f"the blocks layout needs K and the group size in multiples of "
                         f"{BLOCK}, got K={K}, group {group_size}")
    check_tiles(N, K, "int4")


def pack_blocks(w: Int4Weight, dtype: torch.dtype, exact_scales: bool = False) -> Buffers:
    """`dtype` is unused: scale and min are float32, or with exact_scales (a GGUF's fp16
    scales and mins) float16, exactly as stored and half the bytes."""
    N, K = w.q.shape
    _check_blocks(N, K, w.group_size)
    # q[16t + r, 32b + 16h + 4c + j] -> byte (t, b, c, r, j), nibble h
    codes = w.q.view(N // TILE, TILE, K // BLOCK, 2, 4, 4)                   # (T, r, b, h, c, j)
    packed = codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)                    # (T, r, b, c, j)
    qweight = packed.permute(0, 2, 3, 1, 4).reshape(N, K // 2)               # (T, b, c, r, j)
    scale = w.scale.float()
    mins = w.min.float() if w.min is not None else -w.zero.float() * scale   # (N, G)
    if exact_scales:
        scale, mins = _exact_half(scale, "scale"), _exact_half(mins, "min")
    return {"qweight": qweight.contiguous(), "scale": tiled(scale).contiguous(),
            "min": tiled(mins).contiguous()}


def _exact_half(t: torch.Tensor, what: str) -> torch.Tensor:
    half = t.half()
    if not torch.equal(half.float(), t):
        raise ValueError(f"exact int4 {what}s must be float16 values (a GGUF's are)")
    return half


def unpack_blocks(buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q (N, K) uint8, scale (N, G) float32, min (N, G) float32, in row order."""
    p = buffers["qweight"]                                                   # (N, K/2)
    N, half = p.shape
    tiles = p.view(N // TILE, half * 2 // BLOCK, 4, TILE, 4)                 # (T, b, c, r, j)
    nibbles = torch.stack([tiles & 15, tiles >> 4], dim=3)                   # (T, b, c, h, r, j)
    q = nibbles.permute(0, 4, 1, 3, 2, 5).reshape(N, half * 2)               # (T, r, b, h, c, j)
    return q, untiled(buffers["scale"].float()), untiled(buffers["min"].float())


def empty_blocks(N: int, K: int, group_size: int, dtype: torch.dtype,
                 exact_scales: bool = False) -> Buffers:
    _check_blocks(N, K, group_size)
    G = K // group_size
    scale_dtype = torch.float16 if exact_scales else torch.float32
    return {"qweight": torch.empty(N, K // 2, dtype=torch.uint8),
            "scale": torch.empty(N, G, dtype=scale_dtype),
            "min": torch.empty(N, G, dtype=scale_dtype)}


def dequantize(layout: str, buffers: Buffers, group_size: int) -> torch.Tensor:
    """The (N, K) float32 weight the layout's matmul multiplies by (inputs in perm order)."""
    def per_k(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(group_size, dim=1)                        # (N, G) -> (N, K)

    if layout == "kn":
        q, scale, zero = unpack_kn(buffers)
        return (q.float() - per_k(zero)) * per_k(scale)
    if layout == "blocks":
        q, scale, mins = unpack_blocks(buffers)
        return q.float() * per_k(scale) + per_k(mins)
    q, scale, offset = unpack_tinygemm(buffers)
    return (q.float() - 8) * per_k(scale) + per_k(offset)


PACK = {"kn": pack_kn, "tinygemm": pack_tinygemm, "blocks": pack_blocks}
EMPTY = {"kn": empty_kn, "tinygemm": empty_tinygemm, "blocks": empty_blocks}
BUFFER_NAMES = {"kn": ("qweight", "scale", "zero"), "tinygemm": ("qweight", "scale_zero"),
                "blocks": ("qweight", "scale", "min")}
