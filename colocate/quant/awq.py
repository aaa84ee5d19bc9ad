"""Unpack AWQ "GEMM" checkpoints (AutoAWQ, `quant_method: awq`, `version: gemm`).

Per linear (K = in_features, N = out_features, g = group_size):
    qweight int32 (K, N/8)    8 output columns per int32, nibble i (bits 4i..4i+3)
                              holding column 8c + AWQ_ORDER[i]
    qzeros  int32 (K/g, N/8)  zero points, packed the same way
    scales  fp16  (K/g, N)
    W[n, k] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]    (no offset on the zeros)
"""
from __future__ import annotations

import torch

from colocate.quant.qtensors import Int4Weight

# Nibble i of a packed int32 holds column AWQ_ORDER[i] of its group of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 in AWQ order -> (R, C) uint8 in natural column order."""
    R = packed.shape[0]
    nibbles = (packed[:, :, None] >> _SHIFTS) & 15                   # (R, C/8, 8) by nibble
    natural = torch.empty_like(nibbles)
    natural[:, :, list(AWQ_ORDER)] = nibbles              # column AWQ_ORDER[i] <- nibble i
    return natural.reshape(R, -1).to(torch.uint8)


def to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            group_size: int) -> Int4Weight:
    K = qweight.shape[0]
    N = qweight.shape[1] * 8
    G = K // group_size
    expected = {"qweight": (K, N // 8), "qzeros": (G, N // 8), "scales": (G, N)}
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"AWQ {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                             f"for in_features={K}, group_size={group_size}")
    q = unpack_columns(qweight).t().contiguous()                             # (N, K)
    zero = unpack_columns(qzeros).t().float()                                # (N, G)
    return Int4Weight(q=q, scale=scales.t().float().contiguous(), zero=zero.contiguous(),
                      group_size=group_size)
