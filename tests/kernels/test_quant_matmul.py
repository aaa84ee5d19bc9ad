"""W8A16 / W4A16 Triton kernels under TRITON_INTERPRET=1 (set by this folder's
conftest) against torch, at toy sizes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colocate.kernels.w4a16_matmul import w4a16_matmul
from colocate.kernels.w8a16_matmul import w8a16_matmul
from colocate.quant import int4_layouts
from colocate.quant.rtn import quantize_int4, quantize_int8


def _x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)


@pytest.mark.parametrize("m,n,dtype", [(1, 80, torch.float32), (5, 64, torch.float32),
                                       (3, 48, torch.float16)])
def test_w8a16_matches_dequantized_matmul(m, n, dtype):
    k = 96                                        # not a multiple of block_k: masked tail
    q = quantize_int8(torch.randn(n, k) * 0.05, scale_dtype=dtype)
    out = w8a16_matmul(_x(m, k, dtype), q.q, q.scale, block_k=64)
    ref = F.linear(_x(m, k, dtype).float(), q.dequantize())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, **tol)


@pytest.mark.parametrize("m,n,group,dtype", [(1, 80, 32, torch.float32),
                                             (4, 64, 64, torch.float32),
                                             (2, 48, 32, torch.float16)])
def test_w4a16_matches_dequantized_matmul(m, n, group, dtype):
    k = 128
    q = quantize_int4(torch.randn(n, k) * 0.05, group)
    b = int4_layouts.pack_kn(q, dtype)
    out = w4a16_matmul(_x(m, k, dtype), b["qweight"], b["scale"], b["zero"], group)
    w = int4_layouts.dequantize("kn", b, group).to(dtype).float()   # rounded as the kernel does
    ref = F.linear(_x(m, k, dtype).float(), w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    assert out.dtype == dtype and out.shape == (m, n)
    torch.testing.assert_close(out.float(), ref, **tol)


def test_launchers_reject_bad_arguments():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="qweight"):
        w8a16_matmul(x, torch.zeros(16, 32, dtype=torch.int8), torch.ones(16))
    with pytest.raises(ValueError, match="scale"):
        w8a16_matmul(x, torch.zeros(16, 64, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="qweight"):
        w8a16_matmul(x, torch.zeros(16, 64, dtype=torch.int32), torch.ones(16))
    with pytest.raises(ValueError, match="x must be contiguous"):
        w8a16_matmul(torch.randn(64, 2).t(), torch.zeros(16, 64, dtype=torch.int8), torch.ones(16))
    q = torch.zeros(32, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        w4a16_matmul(x, q, torch.ones(2, 16), torch.ones(2, 16), 48)
    with pytest.raises(ValueError, match="zero"):
        w4a16_matmul(x, q, torch.ones(2, 16), torch.ones(1, 16), 32)
    with pytest.raises(ValueError, match="qweight"):
        w4a16_matmul(x, torch.zeros(64, 16, dtype=torch.uint8), torch.ones(2, 16),
                     torch.ones(2, 16), 32)
