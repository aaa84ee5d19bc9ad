"""Round-to-nearest quantization bounds, and both int4 layouts giving back the integers."""
from __future__ import annotations

import pytest
import torch

from colocate.quant import int4_layouts
from colocate.quant.config import QuantConfig
from colocate.quant.rtn import quantize_int4, quantize_int8


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3] = 0.0                                   # an all-zero row must not divide by zero
    w[5, :7] = 0.5                               # an outlier group
    return w


def test_int8_round_trip_within_half_a_step():
    w = _weights(64, 96)
    q = quantize_int8(w)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127
    err = (q.dequantize() - w).abs()                                        # (N, K)
    assert (err <= q.scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(96))
    # The largest weight of each row is represented exactly (up to float rounding).
    rows = torch.arange(64)
    top = w.abs().argmax(dim=1)
    torch.testing.assert_close(q.dequantize()[rows, top], w[rows, top], rtol=1e-6, atol=0)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group):
    w = _weights(48, 256)
    q = quantize_int4(w, group)
    assert q.q.max() <= 15 and q.zero.min() >= 0 and q.zero.max() <= 15
    step = q.scale.repeat_interleave(group, dim=1)                          # (N, K)
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    # Relative error stays in the expected range for Gaussian weights (not the outlier row).
    rel = (q.dequantize() - w)[10:].norm() / w[10:].norm()
    assert rel < {32: 0.09, 64: 0.10, 128: 0.12}[group]


def test_group_size_must_divide_the_input_size():
    with pytest.raises(ValueError, match="quant_group_size=64"):
        quantize_int4(torch.zeros(16, 96), 64)
    with pytest.raises(ValueError, match="quant_group_size=48"):
        QuantConfig.for_device("int4", 48, "cpu")
    with pytest.raises(ValueError, match="quantization='int3'"):
        QuantConfig.for_device("int3", None, "cpu")


@pytest.mark.parametrize("n", [48, 64, 96])          # 48: a last half block of 16 rows
def test_layouts_give_back_the_integers(n):
    q = quantize_int4(_weights(n, 128), 32)
    kn = int4_layouts.pack_kn(q, torch.float16)
    assert kn["qweight"].shape == (64, n) and kn["scale"].dtype == torch.float16
    assert torch.equal(int4_layouts.unpack_kn(kn)[0], q.q)
    tg = int4_layouts.pack_tinygemm(q, torch.float32)
    assert tg["qweight"].shape == (n, 64) and tg["scale_zero"].shape == (4, n, 2)
    assert torch.equal(int4_layouts.unpack_tinygemm(tg)[0], q.q)


def test_tinygemm_offsets_move_weights_by_a_small_part_of_a_step():
    q = quantize_int4(_weights(64, 128), 64, scale_dtype=torch.bfloat16)   # as the handler does
    exact = q.dequantize()
    dq = int4_layouts.dequantize("tinygemm", int4_layouts.pack_tinygemm(q, torch.float32), 64)
    step = q.scale.float().repeat_interleave(64, dim=1)
    assert ((dq - exact).abs() <= step * 8 * 2**-8).all()                 # bf16 offset rounding
    dq_kn = int4_layouts.dequantize("kn", int4_layouts.pack_kn(q, torch.float32), 64)
    assert torch.equal(dq_kn, exact)
