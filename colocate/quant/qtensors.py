"""Quantized weights in their logical form: one integer per weight, unpacked.

Every source (our round-to-nearest, AWQ, GPTQ) produces these, and every device
layout (int4_layouts.py) is packed from them, so importers and kernels never meet.
Shapes follow nn.Linear: N = out_features, K = in_features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int8Weight:
    """Symmetric per-output-channel int8: W[n, k] = q[n, k] * scale[n]."""
    q: torch.Tensor          # (N, K) int8 in [-127, 127]
    scale: torch.Tensor      # (N,) float

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)      # (N, K)


@dataclass
class Int4Weight:
    """Group-wise asymmetric 4-bit: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],
    g = j // group_size for the input channel's position j in `perm` order.

    perm (GPTQ act-order) lists input channels so that each group is contiguous:
    column j of q holds input channel perm[j]. None means the identity.
    """
    q: torch.Tensor                   # (N, K) uint8 in [0, 15]
    scale: torch.Tensor               # (N, K / group) float
    zero: torch.Tensor                # (N, K / group) float, integers in [0, 16] (GPTQ v1: 16)
    group_size: int
    perm: torch.Tensor | None = None  # (K,) int64

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in the original input-channel order."""
        N, K = self.q.shape
        g = self.group_size
        q = self.q.float().view(N, K // g, g)
        w = ((q - self.zero.float()[..., None]) * self.scale.float()[..., None]).view(N, K)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)          # column j -> perm[j]
        return w.to(dtype)


def concat_int4(parts: list[Int4Weight]) -> Int4Weight:
    """Stack along N (fused q/k/v or gate/up). The parts read one input, so they
    must share the group size and the input permutation."""
    first = parts[0]
    for p in parts[1:]:
        if p.group_size != first.group_size:
            raise ValueError(f"fused projections have group sizes {first.group_size} "
                             f"and {p.group_size}")
        if (p.perm is None) != (first.perm is None) or (
                p.perm is not None and not torch.equal(p.perm, first.perm)):
            raise ValueError("fused projections (q/k/v or gate/up) have different act-order "
                             "permutations (g_idx); they cannot share one input")
    return Int4Weight(q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                      zero=torch.cat([p.zero for p in parts]), group_size=first.group_size,
                      perm=first.perm)


def concat_int8(parts: list[Int8Weight]) -> Int8Weight:
    return Int8Weight(q=torch.cat([p.q for p in parts]),
                      scale=torch.cat([p.scale for p in parts]))
