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
    """Symmetric int8: W[n, k] = q[n, k] * scale[n] per output channel, or
    scale[n, k // g] with a scale per group of g input channels (GGUF Q8_0, g = 32)."""
    q: torch.Tensor          # (N, K) int8 in [-127, 127] (Q8_0: [-128, 127])
    scale: torch.Tensor      # (N,) float, or (N, K / g) when grouped

    @property
    def group_size(self) -> int | None:
        return None if self.scale.dim() == 1 else self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.float()
        if scale.dim() == 2:
            scale = scale.repeat_interleave(self.group_size, dim=1)            # (N, K)
        else:
            scale = scale[:, None]                                             # (N, 1)
        return (self.q.float() * scale).to(dtype)                              # (N, K)


@dataclass
class Int4Weight:
    """Group-wise asymmetric 4-bit: W[n, k] = (q[n, k] - zero[n, g]) * scale[n, g],
    g = j // group_size for the input channel's position j in `perm` order.

    perm (GPTQ act-order) lists input channels so that each group is contiguous:
    column j of q holds input channel perm[j]. None means the identity.

    min (GGUF Q4_0 / Q4_1) holds the group's offset in llama.cpp's form
    W = q * scale + min, kept as stored because -min / scale (the zero point it
    implies) is not exact in floating point, and q * scale + min, computed in float32,
    is exactly what llama.cpp and `gguf` dequantize to. `zero` is then -min / scale,
    for layouts that can only hold a zero point.
    """
    q: torch.Tensor                   # (N, K) uint8 in [0, 15]
    scale: torch.Tensor               # (N, K / group) float
    zero: torch.Tensor                # (N, K / group) float, integers in [0, 16] (GPTQ v1: 16)
    group_size: int
    perm: torch.Tensor | None = None  # (K,) int64
    min: torch.Tensor | None = None   # (N, K / group) float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in the original input-channel order."""
        N, K = self.q.shape
        g = self.group_size
        q = self.q.float().view(N, K // g, g)
        if self.min is not None:
            w = (q * self.scale.float()[..., None] + self.min.float()[..., None]).view(N, K)
        else:
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
    mins = [p.min for p in parts]
    if any(m is None for m in mins) and any(m is not None for m in mins):
        raise ValueError("fused projections mix the zero-point and the GGUF min forms")
    return Int4Weight(q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                      zero=torch.cat([p.zero for p in parts]), group_size=first.group_size,
                      perm=first.perm, min=None if mins[0] is None else torch.cat(mins))


def concat_int8(parts: list[Int8Weight]) -> Int8Weight:
    return Int8Weight(q=torch.cat([p.q for p in parts]),
                      scale=torch.cat([p.scale for p in parts]))
