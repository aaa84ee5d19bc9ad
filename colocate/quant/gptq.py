"""Unpack GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`, 4 bits).

Per linear (K = in_features, N = out_features, G groups of g = group_size):
    qweight int32 (K/8, N)    packed along the INPUT: nibble i of row r is channel 8r + i
    qzeros  int32 (G, N/8)    packed along the output: nibble j of column c is column 8c + j
    scales  fp16  (G, N)
    g_idx   int32 (K,)        the group of each input channel
    W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]

Zero points: the original format ("gptq", also called v1, the default when
`checkpoint_format` is absent) stores zero - 1, a historical off-by-one that every
kernel undoes by adding 1 back; a symmetric checkpoint stores 7 for zero 8.
`checkpoint_format: gptq_v2` (GPTQModel) stores the zero itself. `sym` changes only
which zeros appear, not how they are read.

desc_act (act-order) quantizes input channels in a permuted order, so g_idx is not
k // g; we sort the channels by group (stable) to make each group contiguous and keep
the permutation, which the linear applies to its input.
"""
from __future__ import annotations

import torch

from colocate.quant.qtensors import Int4Weight

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
FORMATS = {"gptq": 1, "gptq_v2": 0}            # checkpoint_format -> offset added to zeros


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """(R/8, C) int32 -> (R, C) uint8: nibble i of row r becomes row 8r + i."""
    nibbles = (packed[:, None, :] >> _SHIFTS[None, :, None]) & 15            # (R/8, 8, C)
    return nibbles.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """(R, C/8) int32 -> (R, C) uint8: nibble j of column c becomes column 8c + j."""
    nibbles = (packed[:, :, None] >> _SHIFTS) & 15                           # (R, C/8, 8)
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
            g_idx: torch.Tensor | None, group_size: int, zero_offset: int) -> Int4Weight:
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G = scales.shape[0]
    if K % group_size or G != K // group_size:
        raise ValueError(f"GPTQ scales have {G} groups; in_features={K} with "
                         f"group_size={group_size} needs {K // group_size}")
    expected = {"qzeros": (G, N // 8), "scales": (G, N)}
    for name, t in (("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"GPTQ {name} has shape {tuple(t.shape)}, expected {expected[name]}")
    q = unpack_rows(qweight).t()                                             # (N, K)
    zero = (unpack_columns(qzeros).float() + zero_offset).t()                # (N, G)
    scale = scales.t().float()                                               # (N, G)
    trivial = torch.arange(K) // group_size
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), trivial):
        if g_idx.shape != (K,):
            raise ValueError(f"GPTQ g_idx has shape {tuple(g_idx.shape)}, expected ({K},)")
        perm = torch.sort(g_idx.long(), stable=True).indices                 # (K,)
        if not torch.equal(g_idx.long()[perm], trivial):
            raise ValueError(f"GPTQ g_idx does not give every group exactly {group_size} "
                             "input channels")
        q = q[:, perm]                                        # column j = channel perm[j]
    return Int4Weight(q=q.contiguous(), scale=scale.contiguous(), zero=zero.contiguous(),
                      group_size=group_size, perm=perm)
