"""Combine the partial results of split-K (flash-decoding) attention.

The decode kernel splits a long context into partitions, one program each, and
writes per partition and query head: the unnormalized output acc_p (hd,), the
running max m_p and the sum of weights l_p, both in log2 units. The exact softmax
over the whole context is then

    M = max_p m_p,   w_p = 2 ** (m_p - M),   out = sum_p w_p acc_p / sum_p w_p l_p

Empty partitions carry m_p = -inf and l_p = 0, so they weigh nothing.

The decode launcher caps the partition count, and this kernel walks them P_BLOCK at a
time: loading all of them at once spilled registers at 256 partitions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import FLOAT_DTYPES, check_device, check_tensor, next_pow2

# Partitions read per step: the kernel's registers do not grow with the partition count.
P_BLOCK = 16


@triton.jit
def _merge_partitions_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    stride_os, stride_oh, num_partitions,
    HD: tl.constexpr, HD_P2: tl.constexpr, P_BLOCK: tl.constexpr,
):
    s = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HD_P2)
    base = (s * tl.num_programs(1) + h) * num_partitions
    # Two passes over the partitions, P_BLOCK at a time, so the live tile is
    # (P_BLOCK, HD_P2) however many partitions there are: first the global max ...
    m_all = float("-inf")
    for p0 in range(0, num_partitions, P_BLOCK):
        p = p0 + tl.arange(0, P_BLOCK)
        m = tl.load(part_max_ptr + base + p, mask=p < num_partitions, other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m, axis=0))
    # No key at all (every partition empty): weights 0, output 0 rather than NaN.
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    # ... then the weighted sums.
    total = 0.0
    acc = tl.zeros((HD_P2,), tl.float32)
    for p0 in range(0, num_partitions, P_BLOCK):
        p = p0 + tl.arange(0, P_BLOCK)
        p_mask = p < num_partitions
        m = tl.load(part_max_ptr + base + p, mask=p_mask, other=float("-inf"))
        l = tl.load(part_sum_ptr + base + p, mask=p_mask, other=0.0)
        w = tl.exp2(m - m_all)                                                # (P,)
        total += tl.sum(w * l, axis=0)
        tile = tl.load(part_out_ptr + (base + p)[:, None] * HD_P2 + d[None, :],
                       mask=p_mask[:, None], other=0.0)                       # (P, HD_P2)
        acc += tl.sum(tile * w[:, None], axis=0)
    o = acc / tl.where(total > 0, total, 1.0)                                 # (HD_P2,)
    tl.store(out_ptr + s * stride_os + h * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HD)


def merge_attention_partitions(part_out: torch.Tensor, part_max: torch.Tensor,
                               part_sum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """part_out (S, nh, P, HD_P2) fp32, part_max / part_sum (S, nh, P) fp32, all
    contiguous -> out (S, nh, hd) with hd <= HD_P2, written in place and returned."""
    check_device(part_out=part_out, part_max=part_max, part_sum=part_sum, out=out)
    check_tensor("part_out", part_out, (None, None, None, None), (torch.float32,))
    S, nh, P, hd_p2 = part_out.shape
    for name, t in (("part_max", part_max), ("part_sum", part_sum)):
        check_tensor(name, t, (S, nh, P), (torch.float32,))
    for name, t in (("part_out", part_out), ("part_max", part_max), ("part_sum", part_sum)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    check_tensor("out", out, (S, nh, None), FLOAT_DTYPES)
    if out.shape[2] > hd_p2:
        raise ValueError(f"out head dim {out.shape[2]} exceeds part_out's {hd_p2}")
    if S and nh:
        _merge_partitions_kernel[(S, nh)](
            part_out, part_max, part_sum, out, out.stride(0), out.stride(1), P,
            HD=out.shape[2], HD_P2=hd_p2, P_BLOCK=min(P_BLOCK, next_pow2(P)))
    return out
