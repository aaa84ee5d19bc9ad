"""The x16 order of the CPU block-dot kernels: output rows in tiles of 16.

kernels/cpu/block_dot.c documents it byte by byte. A tile's 16 rows sit side by side,
4 inputs per row per 64 bytes, so one vector register is 4 inputs of 16 rows and an
integer dot instruction against 4 broadcast activation codes makes 16 outputs at once:
a batch of a few activation rows then costs little more than one. The int4 "blocks"
layout (int4_layouts.py) and the CPU int8 layout ("x16", here) both use it; per-row
values (scales, mins) follow the same tiling.
"""
from __future__ import annotations

import torch

TILE = 16     # output rows per tile
BLOCK = 32    # inputs per block (one activation step, one weight scale)
INT8_LAYOUTS = ("rows", "x16")   # "rows": (N, K) as torch and CUDA read it


def check_tiles(N: int, K: int, what: str) -> None:
    if N % TILE:
        raise ValueError(f"{what} on CPU needs out_features divisible by {TILE}, got {N}")
    if K % BLOCK:
        raise ValueError(f"{what} on CPU needs in_features in multiples of {BLOCK}, got {K}")


def fits(N: int, K: int) -> bool:
    return N % TILE == 0 and K % BLOCK == 0


def tiled(t: torch.Tensor) -> torch.Tensor:
    """(N, G) per-row values -> (N, G) in the x16 order: (N/16, G, 16) flattened."""
    N, G = t.shape
    return t.reshape(N // TILE, TILE, G).transpose(1, 2).reshape(N, G)


def untiled(t: torch.Tensor) -> torch.Tensor:
    N, G = t.shape
    return t.reshape(N // TILE, G, TILE).transpose(1, 2).reshape(N, G)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes -> (N, K) in the x16 order: q[16t + r, 32b + 4c + j] at byte
    (t, b, c, r, j)."""
    N, K = q.shape
    check_tiles(N, K, "int8")
    codes = q.reshape(N // TILE, TILE, K // BLOCK, BLOCK // 4, 4)            # (T, r, b, c, j)
    return codes.permute(0, 2, 3, 1, 4).reshape(N, K).contiguous()         # (T, b, c, r, j)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    N, K = packed.shape
    tiles = packed.reshape(N // TILE, K // BLOCK, BLOCK // 4, TILE, 4)       # (T, b, c, r, j)
    return tiles.permute(0, 3, 1, 2, 4).reshape(N, K)                      # (T, r, b, c, j)
