"""Quantized linears on CPU against F.linear over their own dequantized weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colocate.quant.config import QuantConfig
from colocate.quant.cpu_ops import BACKEND_ENV
from colocate.quant.handler import make_linear, quantize_weight


def _linear(method: str, layout: str | None, k: int, n: int, dtype: torch.dtype,
            bias: bool = False):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(n, k, generator=gen) * 0.02
    qc = (QuantConfig("int8") if method == "int8"
          else QuantConfig("int4", group_size=32, layout=layout))
    lin = make_linear(qc, k, n, bias, dtype)
    state = quantize_weight(qc, w, dtype)
    if bias:
        state["bias"] = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    lin.load_state_dict(state, assign=True)
    return lin, w


# (method, int4 layout, CPU matmul backend); int8 has no layout, "kn" no CPU op.
CASES = [("int8", None, "torch"), ("int8", None, "blocks"), ("int4", "tinygemm", "torch"),
         ("int4", "blocks", "blocks"), ("int4", "kn", "torch")]
# Relative error of one product against the exact one over the dequantized weight:
# torch's ops round activations and outputs to bf16 (~2^-8); the block kernels quantize
# activations to int8 per block of 32, a step of max/127 (measured 0.52-0.54% here).
PRODUCT_REL = {"torch": 4e-3, "blocks": 7e-3}


@pytest.mark.parametrize("method,layout,backend", CASES)
@pytest.mark.parametrize("m", [1, 8, 12])        # M = 2 m rows: 24 takes the prefill path
def test_fp32_model_matches_its_dequantized_weight(monkeypatch, method, layout, backend, m):
    monkeypatch.setenv(BACKEND_ENV, backend)
    lin, w = _linear(method, layout, 256, 96, torch.float32, bias=True)
    x = torch.randn(2, m, 256, generator=torch.Generator().manual_seed(2))
    ref = F.linear(x, lin.dequantize(), lin.bias)                            # (2, m, 96)
    out = lin(x)
    assert out.shape == (2, m, 96) and out.dtype == torch.float32
    if layout == "kn":          # CPU fallback of the CUDA layout: dequantize + F.linear
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:
        err = (out - ref).norm() / ref.norm()
        assert err < PRODUCT_REL[backend], err
    # ... and quantization itself is the larger error, as documented.
    quant_err = (F.linear(x, w, lin.bias) - ref).norm() / ref.norm()
    assert quant_err > (out - ref).norm() / ref.norm()


@pytest.mark.parametrize("method,layout,backend", CASES[:4])
def test_bf16_model_matches_the_bf16_reference(monkeypatch, method, layout, backend):
    monkeypatch.setenv(BACKEND_ENV, backend)
    lin, _ = _linear(method, layout, 128, 64, torch.bfloat16)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = F.linear(x.float(), lin.dequantize())                              # fp32 sums
    out = lin(x)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).norm() / ref.norm()
    assert err < PRODUCT_REL[backend] + 4e-3, err             # + the bf16 input and output


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="quant_group_size=128"):
        make_linear(QuantConfig("int4", group_size=128, layout="kn"), 96, 32, False, torch.float32)
