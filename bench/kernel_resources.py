"""Registers and spills of the Triton kernels, compiled for a GPU that need not be here.

    python bench/kernel_resources.py [--arch 80,90] [--cases decode-fp16-g8,...] [--out F.json]

Triton compiles for any target without a device (GPUTarget('cuda', 90, 32)): Triton's
own ptxas turns the kernel into a cubin, and `ptxas -v` says how many registers a
thread uses and how many bytes it spills to local memory. A kernel over 255
registers, or one that spills, is slow before it ever runs; that is what this reads.

Each case calls the real launcher (colocate.kernels.*) on meta tensors with the launch
intercepted, so the kernel is compiled with exactly the constexprs, dtypes and argument
alignment the launcher would use, at real model sizes, without allocating anything.
The kernel modules must be imported compiled (TRITON_INTERPRET unset); the launchers'
device check is lifted while they are called.
Figures depend on the Triton version (its ptxas and its passes): read them with the
version this prints.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Launch:
    kernel: object               # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Resources:
    case: str
    kernel: str
    arch: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    num_warps: int
    triton: str


class _Recorder:
    """Stands in for a JITFunction in its module: `kernel[grid](...)` records, runs nothing."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(
            Launch(self.kernel, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recorded_launches(module_names: list[str]) -> Iterator[list[Launch]]:
    """Within the block, every kernel launch of these modules is recorded, not run."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    swapped = []
    for name in module_names:
        module = importlib.import_module(name)
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction) and attr.startswith("_") and attr.endswith("_kernel"):
                swapped.append((module, attr, value))
                setattr(module, attr, _Recorder(value, launches))
    if not swapped:
        raise RuntimeError("no compiled kernels found: is TRITON_INTERPRET set?")
    # The launchers refuse non-CUDA tensors; their device check is lifted for the block
    # (TRITON_INTERPRET=1 would lift it too, but also switch interpreter-only choices on,
    # such as fp32 dots for bf16).
    checks = [(m, m.check_device) for m in {id(m): m for m, _, _ in swapped}.values()
              if hasattr(m, "check_device")]
    for module, _ in checks:
        module.check_device = _any_device
    try:
        yield launches
    finally:
        for module, attr, value in swapped:
            setattr(module, attr, value)
        for module, check in checks:
            module.check_device = check


def _any_device(**tensors):
    return next(t for t in tensors.values() if t is not None).device


def compile_launch(launch: Launch, arch: int):
    """The CompiledKernel the JIT would build for this launch on sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The JIT's own binding: the same specialization (dtypes, 16-byte alignment) as a launch.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound,
                                                          specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """ptxas -v on the kernel's PTX: registers, spill stores / loads, stack frame bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)      # e.g. sm_90a
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                             capture_output=True, text=True, check=True)
    log = run.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return dict(registers=grab(r"Used (\d+) registers"),
                spill_store_bytes=grab(r"(\d+) bytes spill stores"),
                spill_load_bytes=grab(r"(\d+) bytes spill loads"),
                stack_bytes=grab(r"(\d+) bytes stack frame"))


# ---- the cases: real model shapes ---------------------------------------------------

def _meta(*shape, dtype=torch.float16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _decode(nh: int, nkv: int, hd: int, context: int, kv: str, dtype=torch.float16):
    def call():
        from colocate.kernels.paged_decode_attention import paged_decode_attention
        S, bs = 8, 16
        cache_dtype = torch.int8 if kv == "int8" else dtype
        cache = _meta(4096, bs, nkv, hd, dtype=cache_dtype)
        scale = _meta(4096, bs, nkv, dtype=torch.float32) if kv == "int8" else None
        paged_decode_attention(_meta(S, nh, hd, dtype=dtype), cache, cache,
                               _meta(S, context // bs, dtype=torch.int64),
                               _meta(S, dtype=torch.int32), hd ** -0.5, key_scale=scale,
                               value_scale=scale, max_seq_len=context)
    return call


def _prefill(nh: int, nkv: int, hd: int, kv: str, dtype=torch.float16):
    def call():
        from colocate.kernels.paged_prefill_attention import paged_prefill_attention
        T, S, bs = 2048, 4, 16
        cache_dtype = torch.int8 if kv == "int8" else dtype
        cache = _meta(4096, bs, nkv, hd, dtype=cache_dtype)
        scale = _meta(4096, bs, nkv, dtype=torch.float32) if kv == "int8" else None
        paged_prefill_attention(_meta(T, nh, hd, dtype=dtype), cache, cache,
                                _meta(S, 256, dtype=torch.int64),
                                _meta(S + 1, dtype=torch.int32), _meta(S, dtype=torch.int32),
                                512, hd ** -0.5, key_scale=scale, value_scale=scale)
    return call


def _kv_write(nkv: int, hd: int):
    def call():
        from colocate.kernels.reshape_and_cache import reshape_and_cache
        cache = _meta(4096, 16, nkv, hd, dtype=torch.int8)
        scale = _meta(4096, 16, nkv, dtype=torch.float32)
        x = _meta(64, nkv, hd)
        reshape_and_cache(x, x, cache, cache, _meta(64, dtype=torch.int64), scale, scale)
    return call


def _w8a16(m: int, n: int, k: int):
    def call():
        from colocate.kernels.w8a16_matmul import w8a16_matmul
        w8a16_matmul(_meta(m, k), _meta(n, k, dtype=torch.int8), _meta(n))
    return call


def _w4a16(m: int, n: int, k: int, group: int = 128):
    def call():
        from colocate.kernels.w4a16_matmul import w4a16_matmul
        w4a16_matmul(_meta(m, k), _meta(k // 2, n, dtype=torch.uint8), _meta(k // group, n),
                     _meta(k // group, n), group)
    return call


# name -> launcher call. g = GQA group (query heads per KV head); hd 128 throughout.
CASES: dict[str, Callable[[], None]] = {
    "decode-fp16-g1": _decode(40, 40, 128, 4096, "auto"),        # LLaMA-2-13B
    "decode-int8-g1": _decode(40, 40, 128, 4096, "int8"),
    "decode-fp16-g4": _decode(32, 8, 128, 2048, "auto"),         # Llama-3-8B
    "decode-fp16-g8": _decode(64, 8, 128, 32768, "auto"),        # Llama-3-70B, 32k context
    "decode-int8-g8": _decode(64, 8, 128, 32768, "int8"),
    "decode-bf16-g8": _decode(64, 8, 128, 2048, "auto", torch.bfloat16),
    "prefill-fp16-g1": _prefill(40, 40, 128, "auto"),
    "prefill-fp16-g8": _prefill(64, 8, 128, "auto"),
    "prefill-int8-g4": _prefill(32, 8, 128, "int8"),
    "kv-write-int8-hd128": _kv_write(8, 128),
    "kv-write-int8-hd80": _kv_write(32, 80),
    "w8a16-13b-qkv-m1": _w8a16(1, 15360, 5120),
    "w8a16-13b-qkv-m4096": _w8a16(4096, 15360, 5120),
    "w4a16-13b-down-m1": _w4a16(1, 5120, 13824),
    "w4a16-13b-down-m4096": _w4a16(4096, 5120, 13824),
}
KERNEL_MODULES = [f"colocate.kernels.{m}" for m in (
    "paged_decode_attention", "merge_attention_partitions", "paged_prefill_attention",
    "reshape_and_cache", "w8a16_matmul", "w4a16_matmul")]


def measure(cases: list[str], archs: list[int]) -> list[Resources]:
    import triton

    out = []
    for case in cases:
        with recorded_launches(KERNEL_MODULES) as launches:
            CASES[case]()
        for launch in launches:
            for arch in archs:
                compiled = compile_launch(launch, arch)
                out.append(Resources(case=case, kernel=launch.kernel.fn.__name__, arch=arch,
                                     num_warps=compiled.metadata.num_warps,
                                     triton=triton.__version__,
                                     **ptxas_report(compiled.asm["ptx"], arch)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated; see CASES")
    ap.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    rows = measure(args.cases.split(","), [int(a) for a in args.arch.split(",")])
    print(f"{'case':24} {'kernel':28} {'sm':>3} {'regs':>5} {'spill st/ld':>12} {'stack':>6}")
    for r in rows:
        print(f"{r.case:24} {r.kernel:28} {r.arch:>3} {r.registers:>5} "
              f"{r.spill_store_bytes:>5}/{r.spill_load_bytes:<6} {r.stack_bytes:>6}")
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from source_tree import use_source_tree
    use_source_tree()
    raise SystemExit(main())
