"""W4A16 matmul with group-wise dequantization fused in: the "kn" int4 layout of
colocate/quant/int4_layouts.py.

qweight (K/2, N) uint8: row r holds input channels 2r (low nibble) and 2r+1 (high
nibble) of every output column; scale and zero (K/g, N); W[n, k] = (q - zero) * scale.
Instead of interleaving the two nibble planes back into K order, each K step splits
the activation tile into its even and odd columns, and runs two dots:
    acc += x[:, 0::2] @ W_even + x[:, 1::2] @ W_odd
BLOCK_K divides the group size, so one K step reads one row of scales and zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import FLOAT_DTYPES, check_device, check_tensor


@triton.jit
def _w4a16_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K,
    stride_xm, stride_qk, stride_sg, stride_om,  # last-dim strides are 1 (checked)
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_K // 2)                       # packed rows of one K step
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):                          # K % BLOCK_K == 0 (checked)
        r = k0 // 2 + offs_r
        x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * r[None, :],
                         mask=m_mask[:, None], other=0.0)     # (BM, BK/2)
        x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + 2 * r[None, :] + 1,
                        mask=m_mask[:, None], other=0.0)
        p = tl.load(q_ptr + r[:, None] * stride_qk + offs_n[None, :],
                    mask=n_mask[None, :], other=0)             # (BK/2, BN) uint8
        g = k0 // GROUP
        s = tl.load(scale_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w_even = (((p & 15).to(tl.float32) - z[None, :]) * s[None, :]).to(x_even.dtype)
        w_odd = (((p >> 4).to(tl.float32) - z[None, :]) * s[None, :]).to(x_even.dtype)
        if IEEE:
            acc += tl.dot(x_even, w_even, input_precision="ieee")
            acc += tl.dot(x_odd, w_odd, input_precision="ieee")
        else:
            acc += tl.dot(x_even, w_even)
            acc += tl.dot(x_odd, w_odd)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, group_size: int, block_m: int = 16, block_n: int = 64,
                 block_k: int = 64) -> torch.Tensor:
    """x (M, K) float, qweight (K/2, N) uint8, scale / zero (K/group, N) -> (M, N), x's dtype.

    The weight tile is dequantized in fp32 and rounded to x's dtype for the dot, so the
    result matches F.linear(x, W.to(x.dtype)) up to summation order.
    """
    check_device(x=x, qweight=qweight, scale=scale, zero=zero)
    check_tensor("x", x, (None, None), FLOAT_DTYPES)
    M, K = x.shape
    if group_size < 32 or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"group_size must be a power of two >= 32 dividing K={K}, "
                         f"got {group_size}")
    check_tensor("qweight", qweight, (K // 2, None), (torch.uint8,))
    N = qweight.shape[1]
    check_tensor("scale", scale, (K // group_size, N), FLOAT_DTYPES)
    check_tensor("zero", zero, (K // group_size, N), FLOAT_DTYPES)
    if zero.stride() != scale.stride():
        raise ValueError(f"zero must have scale's strides {scale.stride()}, got {zero.stride()}")
    block_k = min(block_k, group_size)
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if block_k < 32:
        raise ValueError(f"block_k must be >= 32 (two dots of block_k / 2 >= 16), got {block_k}")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w4a16_kernel[grid](x, qweight, scale, zero, out, M, N, K,
                        x.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
                        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return out
