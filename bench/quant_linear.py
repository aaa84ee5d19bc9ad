"""Weight-only quantized linears on CPU: torch's packed ops against dequantize-first paths.

    python bench/quant_linear.py [--threads 1] [--repeats 60] [--out results/quant_linear.json]

For the `small` preset's shapes (K x N) at M = 1 and 8, times (microseconds, the minimum
of `repeats` calls: the machine is shared, and the minimum is the least disturbed) of
fp32 F.linear, the int8 and int4 ops fed fp32 or bf16 activations, the exact
dequantize-then-F.linear paths, and the block-dot kernels (int8 activations). colocate/quant/cpu_ops.py quotes one run. Asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))    # run as a script, not a package
from common import format_table, machine_info, write_json  # noqa: E402

SHAPES = [(768, 2304), (768, 4096), (2048, 768), (768, 768)]
GROUP = 128
A = torch.ops.aten


def best_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e6


def candidates(K: int, N: int, x: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * 0.02
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g) * 1e-3
    q4 = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=g)
    p4 = A._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = torch.stack([torch.rand(K // GROUP, N, generator=g) * 1e-3,
                      torch.randn(K // GROUP, N, generator=g) * 1e-3], -1).bfloat16()
    s = sz[..., 0].float().t().repeat_interleave(GROUP, 1)                   # (N, K)
    z = sz[..., 1].float().t().repeat_interleave(GROUP, 1)
    ones = torch.ones(N, dtype=torch.bfloat16)
    xb = x.bfloat16()
    return {
        "fp32 F.linear": lambda: F.linear(x, w),
        "int8 op, fp32 x": lambda: A._weight_int8pack_mm(x, q8, s8),
        "int8 op, bf16 x": lambda: A._weight_int8pack_mm(x.bfloat16(), q8, ones).float() * s8,
        "int8 op, bf16 model": lambda: A._weight_int8pack_mm(xb, q8, s8.bfloat16()),
        "int8 dequant+linear": lambda: F.linear(x, q8.float()) * s8,
        "int4 op, fp32 x": lambda: A._weight_int4pack_mm_for_cpu(x, p4, GROUP, sz.float()),
        "int4 op, bf16 x": lambda: A._weight_int4pack_mm_for_cpu(x.bfloat16(), p4, GROUP,
                                                                 sz).float(),
        "int4 dequant+linear": lambda: F.linear(x, (q4.float() - 8) * s + z),
        **block_candidates(K, N, x, g),
    }


def block_candidates(K: int, N: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """The block-dot kernels (colocate/quant/block_kernels.py), where they build."""
    from colocate.quant import block_kernels as bk

    if not bk.available():
        return {}
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    qs = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    scale = torch.rand(N, K // 32, generator=g) * 1e-3
    mins = -8 * scale
    return {
        "int8 block-dot": lambda: bk.int8_mm(x, q8, scale, 32),
        "int4 block-dot g32": lambda: bk.int4_mm(x, qs, scale, mins, 32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for K, N in SHAPES:
        for M in (1, 8):
            x = torch.randn(M, K)
            for name, fn in candidates(K, N, x).items():
                slow = "fp32 x" in name                   # 10-100x slower: fewer calls
                repeats = max(5, args.repeats // 10) if slow else args.repeats
                rows.append({"K": K, "N": N, "M": M, "path": name, "us": best_us(fn, repeats)})
    headers = ["K", "N", "M", "path", "us"]
    print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
