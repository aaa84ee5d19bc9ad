"""The CPU block-dot kernels (kernels/cpu/block_dot.c) against torch, both bodies.

The kernels quantize the activations to int8 per block of 32 and then compute integer
dot products, so the reference is exact given those codes: it dequantizes the same
codes in float64. Each body (portable C, AVX2, AVX-512 VNNI) is called explicitly,
whatever torch's own capability, and must agree with it to float32 accumulation order;
a body the CPU cannot execute is skipped, naming it.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from colocate.quant import block_kernels as bk
from colocate.quant import row_tiles
from colocate.quant.int4_layouts import pack_blocks, unpack_blocks
from colocate.quant.rtn import quantize_int4

BODIES = [bk.BODY_C, bk.BODY_AVX2, bk.BODY_AVX512]


def runnable(simd: int) -> int:
    if simd not in bk.runnable_bodies():
        pytest.skip(f"this CPU cannot run the {bk.BODY_NAMES[simd]} body")
    return simd


def _activations(M: int, K: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    x[0, :32] = 0.0                                   # an all-zero block: step 0, codes 0
    return x


def _dequantized_activations(x: torch.Tensor) -> torch.Tensor:
    xq, xd, xs = bk.quantize_activations(x)
    M, K = x.shape
    assert torch.equal(xs, xq.view(M, -1, 32).sum(-1, dtype=torch.int32))
    return (xq.double().view(M, -1, 32) * xd.double()[..., None]).view(M, K)


@pytest.mark.parametrize("rows,threads", [(3, 1), (40, 1), (40, 2), (40, 3)])
def test_activation_codes_are_round_to_nearest_of_each_blocks_step(rows, threads,
                                                                    monkeypatch):
    """A decode's few rows on one thread, a prefill's many split among the threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = _activations(rows, 96, 0)
    xq, xd, xs = bk.quantize_activations(x)
    assert torch.equal(xs, xq.view(rows, -1, 32).sum(-1, dtype=torch.int32))
    blocks = x.view(rows, 3, 32)
    step = blocks.abs().amax(-1) / 127                                      # (M, B)
    torch.testing.assert_close(xd, step, rtol=0, atol=0)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(blocks / safe[..., None]).to(torch.int8).view(rows, 96)
    assert torch.equal(xq, codes)
    assert xq.abs().max() <= 127 and torch.all(xq[0, :32] == 0)


def _gguf_like(w):
    """w with float16 scales and mins, as a GGUF's Q4_1 holds them (W = q * d + m)."""
    scale = w.scale.half().float()
    mins = (-w.zero * w.scale).half().float()
    return dataclasses.replace(w, scale=scale, min=mins, zero=-mins / scale)


@pytest.mark.parametrize("simd", BODIES)
@pytest.mark.parametrize("half", [False, True])
# Tiles of 16 weight rows (the x16 layout) by up to 2 (AVX2) or 4 (AVX-512) activation
# rows, with remainders of both; 320, 576, 800 and 1536 inputs, with groups of 1, 2 and 4
# blocks; several tiles per thread and one.
@pytest.mark.parametrize("M,N,K,group", [(1, 64, 64, 32), (3, 48, 128, 64), (8, 32, 256, 128),
                                         (5, 16, 32, 32), (1, 48, 320, 64), (1, 16, 1536, 128),
                                         (1, 32, 576, 32), (6, 16, 96, 32), (2, 32, 800, 32)])
def test_int4_blocks_match_the_dequantized_product(simd, half, M, N, K, group):
    gen = torch.Generator().manual_seed(M * N + K)
    w = quantize_int4(torch.randn(N, K, generator=gen), group)
    if half:
        w = _gguf_like(w)
    buffers = pack_blocks(w, torch.float32, exact_scales=half)
    assert buffers["scale"].dtype == (torch.float16 if half else torch.float32)
    q, scale, mins = unpack_blocks(buffers)
    assert torch.equal(q, w.q)                                # the packing round-trips
    x = _activations(M, K, seed=K)
    y = bk.int4_mm(x, buffers["qweight"], buffers["scale"], buffers["min"], group,
                   simd=runnable(simd))
    ref = _dequantized_activations(x) @ w.dequantize(torch.float64).T       # (M, N)
    # float32 sums of up to 48 blocks against float64: a few ulps of outputs up to ~10
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=3e-5)
    dense = bk.int4_dequantize(buffers["qweight"], buffers["scale"], buffers["min"], group)
    torch.testing.assert_close(dense, w.dequantize(), rtol=1e-6, atol=1e-6)
    if half:                          # q * scale + min, both ways, from the same halves
        assert torch.equal(dense, w.dequantize())


@pytest.mark.parametrize("simd", BODIES)
@pytest.mark.parametrize("M,N,K,group", [(1, 64, 64, 32), (3, 48, 128, 128), (8, 32, 96, 96),
                                         (2, 16, 32, 32), (1, 32, 576, 32), (5, 16, 320, 64),
                                         (6, 16, 96, 32), (1, 16, 800, 32)])
def test_int8_blocks_match_the_dequantized_product(simd, M, N, K, group):
    gen = torch.Generator().manual_seed(M + N * K)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)  # -128: GGUF Q8_0
    scale = torch.rand(N, K // group, generator=gen) * 0.01
    x = _activations(M, K, seed=N)
    y = bk.int8_mm(x, row_tiles.pack_int8(q), row_tiles.tiled(scale), group,
                   simd=runnable(simd))
    w = q.double() * scale.double().repeat_interleave(group, dim=1)           # (N, K)
    ref = _dequantized_activations(x) @ w.T
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(row_tiles.unpack_int8(row_tiles.pack_int8(q)), q)


@pytest.mark.parametrize("M", [1, 2, 3, 8])
def test_every_body_agrees_on_a_decode_sized_layer(M):
    w = quantize_int4(torch.randn(96, 576, generator=torch.Generator().manual_seed(4)), 32)
    b = pack_blocks(w, torch.float32)
    x = _activations(M, 576, seed=5)
    outs = [bk.int4_mm(x, b["qweight"], b["scale"], b["min"], 32, simd=s)
            for s in bk.runnable_bodies()]
    for out in outs[1:]:      # float32 sums in other orders, as against the reference
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=3e-5)


def test_the_default_body_follows_torchs_capability():
    wanted = {"DEFAULT": bk.BODY_C, "AVX2": bk.BODY_AVX2,
              "AVX512": bk.BODY_AVX512}[torch.backends.cpu.get_cpu_capability()]
    assert bk.default_simd() == min(wanted, bk.best_body())


def test_bad_shapes_are_refused_by_name():
    q = torch.zeros(16, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"x must be \(M, 64\) float32"):
        bk.int8_mm(torch.zeros(1, 32), q, torch.ones(16, 2), 32)
    with pytest.raises(ValueError, match="multiples of 32"):
        bk.int8_mm(torch.zeros(1, 64), q, torch.ones(16, 3), 48)
    with pytest.raises(ValueError, match="out_features divisible by 16, got 8"):
        bk.int8_mm(torch.zeros(1, 64), q[:8], torch.ones(8, 2), 32)


def test_the_x16_layout_puts_each_code_where_block_dot_c_says():
    """block_dot.c's layout, element by element: code (n, k) is nibble k // 16 % 2 of
    byte (t * K/32 + b) * 256 + c * 64 + 4 r + j, for n = 16 t + r, k = 32 b + 16 h + 4 c + j;
    scale (n, g) at (t * G + g) * 16 + r."""
    N, K, group = 32, 128, 64
    w = quantize_int4(torch.randn(N, K, generator=torch.Generator().manual_seed(8)), group)
    b = pack_blocks(w, torch.float32)
    flat, scales = b["qweight"].reshape(-1), b["scale"].reshape(-1)
    G = K // group
    for n, k in [(0, 0), (0, 17), (5, 3), (15, 31), (16, 32), (21, 70), (31, 127)]:
        t, r, blk, h, c, j = n // 16, n % 16, k // 32, k % 32 // 16, k % 16 // 4, k % 4
        byte = int(flat[(t * (K // 32) + blk) * 256 + c * 64 + 4 * r + j])
        assert (byte >> (4 * h)) & 15 == int(w.q[n, k]), (n, k)
        assert scales[(t * G + k // group) * 16 + r] == w.scale[n, k // group].float()


def test_int4_rows_must_fill_whole_tiles():
    w = quantize_int4(torch.randn(24, 64, generator=torch.Generator().manual_seed(9)), 32)
    with pytest.raises(ValueError, match="out_features divisible by 16, got 24"):
        pack_blocks(w, torch.float32)


def test_the_kernels_build_here():
    """Every machine the suite runs on has a C compiler; without one the CPU models fall
    back to torch's ops, which is correct but slow, so a missing build must not pass
    unnoticed."""
    assert bk.available(), "kernels/cpu/block_dot.c did not build: see the warning logged"


def test_dequantization_is_exact():
    """The prefill path's weights: the C dequantization equals torch's, bit for bit."""
    w = quantize_int4(torch.randn(48, 128, generator=torch.Generator().manual_seed(6)), 64)
    b = pack_blocks(w, torch.float32)
    _, scale, mins = unpack_blocks(b)                                       # row order
    assert torch.equal(bk.int4_dequantize(b["qweight"], b["scale"], b["min"], 64),
                       w.q.float() * scale.repeat_interleave(64, 1)
                       + mins.repeat_interleave(64, 1))
    q = torch.randint(-128, 128, (16, 96), dtype=torch.int8)
    scale = torch.rand(16, 3)
    assert torch.equal(bk.int8_dequantize(row_tiles.pack_int8(q), row_tiles.tiled(scale), 32),
                       q.float() * scale.repeat_interleave(32, 1))


@pytest.mark.parametrize("half,group", [(False, 32), (True, 32), (False, 64)])
def test_bf16_dequantization_is_the_exact_weight_rounded_to_nearest(half, group):
    """The bf16 prefill's weights (on an AVX512_BF16 CPU, the hardware's conversion):
    torch's own float32 -> bfloat16 rounding of the exact dequantization, bit for bit
    (ties to even included), with float32 or a GGUF's float16 scales."""
    w = quantize_int4(torch.randn(32, 96 if group == 32 else 128,
                                  generator=torch.Generator().manual_seed(7)), group)
    if half:
        w = _gguf_like(w)
    b = pack_blocks(w, torch.float32, exact_scales=half)
    exact = bk.int4_dequantize(b["qweight"], b["scale"], b["min"], group)
    assert torch.equal(bk.int4_dequantize(b["qweight"], b["scale"], b["min"], group,
                                          torch.bfloat16), exact.bfloat16())
    q = torch.randint(-128, 128, (16, 96), dtype=torch.int8)
    scale = torch.rand(16, 3)
    assert torch.equal(bk.int8_dequantize(q, scale, 32, torch.bfloat16),
                       bk.int8_dequantize(q, scale, 32).bfloat16())
    with pytest.raises(ValueError, match="dequantized weight is one of"):
        bk.int8_dequantize(q, scale, 32, torch.float16)
