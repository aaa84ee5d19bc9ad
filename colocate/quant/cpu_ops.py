"""int8 / int4 matmuls on CPU: the block-dot kernels where they build, else torch's ops.

Where a C compiler is present (block_kernels.available()), every CPU int8 linear in
the "x16" layout and every int4 linear in the "blocks" layout runs
kernels/cpu/block_dot.c (both tile 16 output rows, row_tiles.py): activations are
quantized to int8 per block of 32 inputs and multiplied by integer dot products, as
llama.cpp does (a prefill chunk of more rows than _prefill_rows() instead dequantizes the
weight exactly and multiplies in float32). Measured on the AVX2 box (1 thread, minimum
of 40 calls, M = 1 row): 3072x576 int4 145-163 us against torch's int4 op 267-277 us, 576x1536 70-85 us against
134-149 us (bench/decode.py has the whole-model figures). What it costs in accuracy is
llama.cpp's own trade, measured in docs/benchmarks.md on a real model.
`COLOCATE_CPU_MATMUL=torch` keeps torch's ops below (and the tinygemm int4 layout).

torch's weight-only ops, the fallback:

Measured on the 2-core AVX2 box (torch 2.13, 1 thread, microseconds, the minimum of
40 calls; the `small` preset's shapes; `python bench/quant_linear.py` reproduces it):

    K x N      M | fp32      int8 op   int8 op   int8 dequant | int4 op   int4 op   int4 dequant
                 | F.linear  fp32 x    bf16 x*   + F.linear   | fp32 x    bf16 x*   + F.linear
    768x2304   1 |  157       1670      150       343         |  3485      254      11280
    768x2304   8 |  690      13461      655       887         | 27757      654       3307
    768x4096   1 |  280       2982      254       606         |  6157      441       6178
    768x4096   8 | 1315      24256     1157      2542         | 49349     1151       8243
    2048x768   1 |  135       1499      126       296         |  3093      226       1975
    2048x768   8 |  689      12306      555       878         | 24760      581       2858
    768x768    1 |   51        552       57       110         |  1148       90        501
    768x768    8 |  215       4517      224       274         |  9254      226        609
    * an fp32 model's path: x to bf16, the op with unit scales, output to fp32, times the
      fp32 scale (all included). A bf16 model calls the op directly: 2-10% faster still.
    "dequant + F.linear" are the exact fp32 paths: F.linear(x, q.float()) * scale for
    int8 (the cheapest exact one), F.linear(x, (q - zero) * scale) for int4.

The ops on bf16 activations are the fastest at every shape and M: as fast as fp32
F.linear for int8 (and int4 at M=8; int4 at M=1 is 1.6x slower, unpacking bound),
2-3x faster than exact int8 dequantization and 2-40x faster than int4's. Fed fp32
activations they are 10-100x slower. So every CPU model runs them on bf16 activations.

For an fp32 model that is not bit-exact: activations and outputs are rounded to bf16
(relative 2^-9 each); the weights, scales included, are used exactly. Measured against
the exact dequantized path: one matmul is 0.2-0.4% off (tests/quant/test_linear.py,
where quantization itself is several times that); the tiny model's logits move by rms
0.011, against int8's own rms 0.031 from float (the total grows by 6%) and int4's 0.47,
and the argmax agreement with float is unchanged (96% int8, 65% int4 g128). We judged
that accurate enough for weight-only modes whose point is memory; an exact fp32 int8
path (2.3x slower at M=1) would be F.linear(x, qweight.float()) * scale.
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch

from colocate import cpu_features
from colocate.quant import block_kernels

COMPUTE_DTYPE = torch.bfloat16
BACKEND_ENV = "COLOCATE_CPU_MATMUL"     # "blocks" (the default where it builds) | "torch"


# Above this many activation rows (a prefill chunk) the product is compute bound: the
# weight is dequantized once for the call (in C, exactly) and multiplied by the BLAS in
# float, several times faster than integer dot products on AVX2. Not for a weight
# larger than DEQUANTIZE_MAX_WEIGHTS (the output head: 28 M weights would be a 113 MB
# temporary per call), which stays on the kernel.
PREFILL_ROWS = 16
# With AVX-512 VNNI the kernels stay ahead of dequantization + bf16 BLAS further.
# Measured on a Zen 4 (2 threads, activation quantization split among them, ms, kernel
# against dequantize + matmul; one run): 3072x576 at M = 64 / 128 / 256 / 512: 0.26 /
# 0.52 / 1.01 / 2.02 against 0.59 / 0.89 / 1.37 / 3.09; 576x1536 at 64 / 128 / 512:
# 0.26 / 0.40 / 1.56 against 0.31 / 0.51 / 1.38. But whole prefills (bench/decode.py,
# SmolLM2 as stored) with the kernels at every length: TTFT 88.7 / 378 ms at 128 / 512
# tokens, against 90.9 / 344 with dequantization past 64 rows. Measured again
# (2026-12-03, another Zen 4 of this kind, whole prefills, minima of 3 per round, ms,
# dequantized past 64 or 256 rows against the kernels at every length): 128 tokens
# 236 / 163 / 280 (past 64) against 150 / 124 / 199; 256 tokens 437 / 388 / 454
# against 317 / 316 / 353; 512 tokens 714 / 680 / 565 (past 256) against 638 / 545 /
# 443; 1,024 tokens 1,476 / 1,308 / 1,163 against 1,200 / 1,085 / 1,245. And
# bench/decode.py against HF bf16 at 512 tokens, two runs each: 564 / 718 ms against
# 520 / 639 dequantized past 256, 555 / 568 against 552 / 602 with the kernels. Per
# layer at M = 512 the kernels took 8.2 ms against 9.1 for the bf16 products plus 0.5
# to dequantize. So on this body the kernels take every product (the first run's 512
# stands alone against seven); the AVX2 body is not re-measured and keeps 16. With AMX
# bf16 tiles the BLAS is another machine (512 x 576 -> 3072 in 0.79 ms on an AMX Xeon,
# against the kernel's 2.02 on the Zen 4): there the threshold stays 64, as it was
# (not re-measured on AMX).
PREFILL_ROWS_VNNI = 1 << 30
PREFILL_ROWS_AMX = 64
DEQUANTIZE_MAX_WEIGHTS = 8 * 2**20

# The prefill product's precision follows cpu_features.prefill_dtype(): float32 (exact),
# or bfloat16 where the CPU has bf16 units (AMX or AVX512_BF16). Measured on an AMX
# Xeon, 2 threads, 512 x 576 -> 3072: float32 5.0 ms, bfloat16 0.79 ms. The weight is
# dequantized straight to that dtype. The decode kernels are not affected: they
# quantize activations to int8.

def _prefill(M: int, N: int, K: int) -> bool:
    return M > _prefill_rows() and N * K <= DEQUANTIZE_MAX_WEIGHTS


def _prefill_rows() -> int:
    if block_kernels.default_simd() != block_kernels.BODY_AVX512:
        return PREFILL_ROWS
    return PREFILL_ROWS_AMX if cpu_features.amx_bf16_here() else PREFILL_ROWS_VNNI


def _dequantized_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K).T, w the weight dequantized in its compute dtype."""
    return torch.nn.functional.linear(x.to(w.dtype), w).to(x.dtype)          # (M, N)


def block_kernels_on() -> bool:
    choice = os.environ.get(BACKEND_ENV, "blocks")
    if choice not in ("blocks", "torch"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected 'blocks' or 'torch'")
    return choice == "blocks" and block_kernels.available()


def int4_layout() -> str:
    """The int4 layout a CPU model is packed in, here and now."""
    return "blocks" if block_kernels_on() else "tinygemm"


@lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    with torch.inference_mode():
        return torch.ones(n, dtype=COMPUTE_DTYPE)


def int8_layout() -> str:
    """The int8 layout a CPU model is packed in, here and now (Int8Linear.layout_for
    keeps rows for a shape the tiles do not fit)."""
    return "x16" if block_kernels_on() else "rows"


def int8_x16_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K); qweight (N, K) int8 and scale (N,) or (N, K/g), in the x16 tile order
    (the block-dot kernels') -> (M, N) in x's dtype."""
    if not block_kernels.available():
        raise RuntimeError("an int8 model packed in the x16 layout needs the CPU block "
                           "kernels, which did not build here (see the log); reload it "
                           f"with {BACKEND_ENV}=torch")
    N, K = qweight.shape
    s = scale.float().reshape(N, -1)                                            # (N, G)
    if _prefill(x.shape[0], N, K):
        w = block_kernels.int8_dequantize(qweight, s, K // s.shape[1],
                                          cpu_features.prefill_dtype())          # (N, K)
        return _dequantized_product(x, w)
    return block_kernels.int8_mm(x.float(), qweight, s, K // s.shape[1]).to(x.dtype)


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, K), qweight (N, K) int8 in row order, scale (N,) or (N, K/g) -> (M, N) in
    x's dtype: torch's ops (the x16 layout takes int8_x16_mm)."""
    N, K = qweight.shape
    if scale.dim() == 2:                   # grouped (GGUF Q8_0): no torch op takes it
        scale = scale.float().repeat_interleave(K // scale.shape[1], dim=1)     # (N, K)
        return torch.nn.functional.linear(x, (qweight.float() * scale).to(x.dtype))
    if x.dtype == COMPUTE_DTYPE:
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scale.to(COMPUTE_DTYPE))
    out = torch.ops.aten._weight_int8pack_mm(x.to(COMPUTE_DTYPE), qweight,
                                              _ones(qweight.shape[0]))          # (M, N) bf16
    return out.to(x.dtype) * scale.to(x.dtype)


def int4_mm(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (M, K), tinygemm-packed qweight (N, K/2), scale_zero (K/g, N, 2) -> (M, N).

    A GGUF kept exact stores scale_zero in float32; the op still runs on bf16 (its
    float32 mode measured 9-10x slower: 5.0 vs 0.54 ms at M=1, 82 vs 8 ms at M=40 for
    1536x576 on the AVX2 box), so those scales are rounded per call (G*N*2 values,
    a few percent of the op's time) rather than kept twice."""
    if scale_zero.dtype != COMPUTE_DTYPE:
        scale_zero = scale_zero.to(COMPUTE_DTYPE)                               # (K/g, N, 2)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(COMPUTE_DTYPE), qweight, group_size, scale_zero)                   # (M, N) bf16
    return out.to(x.dtype)


def int4_blocks_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   mins: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K); the "blocks" layout: qweight (N, K/2), scale and min (N, K/g) -> (M, N)."""
    if not block_kernels.available():
        raise RuntimeError("an int4 model packed in the blocks layout needs the CPU block "
                           "kernels, which did not build here (see the log); reload it "
                           f"with {BACKEND_ENV}=torch")
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if _prefill(x.shape[0], N, K):
        w = block_kernels.int4_dequantize(qweight, scale, mins, group_size,
                                          cpu_features.prefill_dtype())          # (N, K)
        return _dequantized_product(x, w)
    return block_kernels.int4_mm(x.float(), qweight, scale, mins, group_size).to(x.dtype)
