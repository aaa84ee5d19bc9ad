"""W8A16 matmul: out = (x @ q^T) * scale, int8 weights with one scale per output channel.

The int8 tile is converted to the activation dtype in registers (exact: |q| <= 127
fits every float type), so the weights cross memory as one byte each. The per-channel
scale is constant along K and is applied once to the fp32 accumulator at the end,
which also keeps it out of the fp16/bf16 rounding of the dot inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from colocate.kernels._checks import FLOAT_DTYPES, check_device, check_tensor


@triton.jit
def _w8a16_kernel(
    x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K,
    stride_xm, stride_qn, stride_om,             # last-dim strides are 1 (checked)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 offsets: row * stride overflows int32 for long prompts times wide layers.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)       # (BM, BK)
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + k[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0)         # (BK, BN) int8
        if IEEE:
            acc += tl.dot(x, q.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, q.to(x.dtype))
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)  # (BN,)
    out = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 block_m: int = 16, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x (M, K) float, qweight (N, K) int8, scale (N,) float -> (M, N) in x's dtype.

    fp32 activations use IEEE fp32 dots (not TF32): an fp32 model asks for fp32 sums.
    """
    check_device(x=x, qweight=qweight, scale=scale)
    check_tensor("x", x, (None, None), FLOAT_DTYPES)
    M, K = x.shape
    check_tensor("qweight", qweight, (None, K), (torch.int8,))
    N = qweight.shape[0]
    check_tensor("scale", scale, (N,), FLOAT_DTYPES)
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w8a16_kernel[grid](x, qweight, scale, out, M, N, K,
                        x.stride(0), qweight.stride(0), out.stride(0),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                        IEEE=x.dtype == torch.float32)
    return out
