"""The CPU block-dot kernels (kernels/cpu/block_dot.c): built on first use, called by ctypes.

What they compute: y = x @ W.T for int4 / int8 weights in blocks of 32 along K, with the
activations quantized to int8 per block of 32 on the way in (llama.cpp's trade for its
Q4/Q8 dot products). Why: on a CPU, torch's weight-only ops unpack each weight into
bf16 and multiply in floats; on AVX2 that is compute bound at 2-3 GMAC/s per core,
slower than reading the weights. An integer dot product of 32 lanes per instruction
keeps a decode step at the speed of memory. See cpu_ops.py for when they are used.

The C file is plain C with no torch headers, so it compiles in about a second with the
system's C compiler (`cc`, or $CC). The library is cached under
$COLOCATE_CACHE_DIR (default ~/.cache/colocate), named by a hash of the source and the
flags, so every process of a deployment loads the same file and a change of the source
rebuilds it. With no compiler, `available()` is False and the callers keep torch's ops.

`simd`: which body runs: BODY_C (portable), BODY_AVX2 or BODY_AVX512 (with VNNI). The
default follows torch's own run-time choice (ATEN_CPU_CAPABILITY), capped by what the
CPU has, so `ATEN_CPU_CAPABILITY=default` exercises the portable body and `=avx2` the
AVX2 one on an AVX-512 machine; tests call every body the CPU can run explicitly.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from colocate.quant.row_tiles import check_tiles

log = logging.getLogger(__name__)

BLOCK = 32
CACHE_ENV = "COLOCATE_CACHE_DIR"
CFLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-std=c11")


# One library from every C file of kernels/cpu (decode_step.c calls block_dot.c's
# kernels); the header is hashed with them, so a change to it rebuilds too.
SOURCES = ("block_dot.c", "block_dot_avx2.c", "block_dot_avx512.c", "decode_ops.c",
           "decode_step.c")

# The bodies, as block_dot.h numbers them.
BODY_C, BODY_AVX2, BODY_AVX512 = 0, 1, 2
BODY_NAMES = {BODY_C: "portable C", BODY_AVX2: "AVX2", BODY_AVX512: "AVX-512 VNNI"}
HEADERS = ("block_dot.h",)


def _cpu_dir() -> Path:
    """kernels/ is installed as colocate.kernels: find its C files either way."""
    from colocate import kernels

    return Path(kernels.__file__).resolve().parent / "cpu"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "colocate")


def _build(sources: list[Path]) -> Path:
    text = b"".join(p.read_bytes() for p in [*sources, *(_cpu_dir() / h for h in HEADERS)])
    compiler = os.environ.get("CC", "cc")
    tag = hashlib.sha256(text + " ".join((compiler, *CFLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"block_dot-{tag}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes starting together never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, *map(str, sources), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build([_cpu_dir() / name for name in SOURCES])))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.warning("CPU block-dot kernels unavailable (%s); using torch's int8/int4 ops",
                    str(detail).strip()[:500])
        return None
    lib.block_dot_best_body.restype = _INT
    lib.quantize_rows.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _INT]
    lib.int4_block_mm.argtypes = [_PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _PTR, _PTR, _PTR,
                                  _I64, _PTR, _INT, _INT]
    lib.int4_block_mm.restype = None
    lib.int8_block_mm.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR,
                                  _INT, _INT]
    lib.int4_block_dequantize.argtypes = [_PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _PTR, _INT,
                                          _INT]
    lib.int8_block_dequantize.argtypes = [_PTR, _PTR, _I64, _I64, _I64, _PTR, _INT, _INT]
    lib.decode_step_workspace.argtypes = [_PTR, _I64, _I64]
    lib.decode_step_workspace.restype = _I64
    lib.decode_step.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _INT,
                                _INT]
    lib.decode_step.restype = _INT
    return lib


def available() -> bool:
    return _library() is not None


@functools.lru_cache(maxsize=1)
def best_body() -> int:
    """The widest body this CPU runs (BODY_C where the kernels did not build)."""
    lib = _library()
    return BODY_C if lib is None else int(lib.block_dot_best_body())


def runnable_bodies() -> list[int]:
    return list(range(best_body() + 1))


# torch's capability names -> the widest body it admits
_CAPABILITY_BODY = {"DEFAULT": BODY_C, "AVX2": BODY_AVX2, "AVX512": BODY_AVX512}


@functools.lru_cache(maxsize=1)
def default_simd() -> int:
    """The body of torch's own dispatch level, capped by what the CPU has: asked once per
    process (torch fixes its capability at start), and every matmul uses it."""
    wanted = _CAPABILITY_BODY.get(torch.backends.cpu.get_cpu_capability(), BODY_C)
    return min(wanted, best_body())


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> codes (M, K) int8, steps (M, K/32) float32, code sums (M, K/32)
    int32: x ~= codes * step per block of 32."""
    M, K = x.shape
    x = x.contiguous()
    xq = torch.empty(M, K, dtype=torch.int8)
    xd = torch.empty(M, K // BLOCK, dtype=torch.float32)
    xs = torch.empty(M, K // BLOCK, dtype=torch.int32)
    _library().quantize_rows(_ptr(x), M, K, _ptr(xq), _ptr(xd), _ptr(xs),
                             torch.get_num_threads())
    return xq, xd, xs


def _check(x: torch.Tensor, K: int, group: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, {K}) float32, got {tuple(x.shape)} {x.dtype}")
    if K % BLOCK or group % BLOCK or K % group:
        raise ValueError(f"K={K} and group={group} must be multiples of {BLOCK}, group "
                         f"dividing K")


SCALE_DTYPES = (torch.float32, torch.float16)


def half_scales(scale: torch.Tensor, mins: torch.Tensor) -> bool:
    """Whether int4 scales and mins are float16 (a GGUF's own) rather than float32."""
    if scale.dtype not in SCALE_DTYPES or mins.dtype != scale.dtype:
        raise ValueError(f"int4 scale and min must both be one of {SCALE_DTYPES}, got "
                         f"{scale.dtype} and {mins.dtype}")
    return scale.dtype == torch.float16


def _body(simd: int | None) -> int:
    return default_simd() if simd is None else int(simd)


def int4_mm(x: torch.Tensor, qs: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
            group: int, simd: int | None = None) -> torch.Tensor:
    """x (M, K) float32; qs (N, K/2) uint8, scale and mins (N, K/group) float32 or float16,
    in the x16 tile order (block_dot.c, int4_layouts.pack_blocks) -> (M, N) float32,
    W = q * scale + min."""
    N, K = qs.shape[0], qs.shape[1] * 2
    _check(x, K, group)
    check_tiles(N, K, "int4")
    half = half_scales(scale, mins)
    xq, xd, xs = quantize_activations(x)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    _library().int4_block_mm(_ptr(qs), _ptr(scale), _ptr(mins), int(half), N, K, group,
                             _ptr(xq), _ptr(xd), _ptr(xs), x.shape[0], _ptr(y), _body(simd),
                             torch.get_num_threads())
    return y


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group: int,
            simd: int | None = None) -> torch.Tensor:
    """x (M, K) float32; q (N, K) int8 in [-127, 127] (GGUF's -128 too) and scale
    (N, K/group) float32 (group = K: one scale per row), both in the x16 tile order
    (row_tiles.pack_int8, row_tiles.tiled) -> (M, N) float32."""
    N, K = q.shape
    _check(x, K, group)
    check_tiles(N, K, "int8")
    xq, xd, xs = quantize_activations(x)
    y = torch.empty(x.shape[0], N, dtype=torch.float32)
    _library().int8_block_mm(_ptr(q), _ptr(scale), N, K, group, _ptr(xq), _ptr(xd),
                             _ptr(xs), x.shape[0], _ptr(y), _body(simd),
                             torch.get_num_threads())
    return y


DEQUANTIZED_DTYPES = (torch.float32, torch.bfloat16)


def _dequantized(N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype not in DEQUANTIZED_DTYPES:
        raise ValueError(f"a dequantized weight is one of {DEQUANTIZED_DTYPES}, not {dtype}")
    return torch.empty(N, K, dtype=dtype)


def int4_dequantize(qs: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor,
                    group: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight of int4_mm's operands, q * scale + min: exactly in float32, or
    that rounded to nearest bfloat16."""
    N, K = qs.shape[0], qs.shape[1] * 2
    check_tiles(N, K, "int4")
    half = half_scales(scale, mins)
    w = _dequantized(N, K, dtype)
    _library().int4_block_dequantize(_ptr(qs), _ptr(scale), _ptr(mins), int(half), N, K, group,
                                     _ptr(w), int(dtype == torch.bfloat16),
                                     torch.get_num_threads())
    return w


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight of int8_mm's operands (x16 order in, row order out), q * scale:
    float32 exactly, or bfloat16."""
    N, K = q.shape
    if K % BLOCK or group % BLOCK or K % group:
        raise ValueError(f"K={K} and group={group} must be multiples of {BLOCK}, group "
                         f"dividing K")
    check_tiles(N, K, "int8")
    w = _dequantized(N, K, dtype)
    _library().int8_block_dequantize(_ptr(q), _ptr(scale), N, K, group, _ptr(w),
                                     int(dtype == torch.bfloat16), torch.get_num_threads())
    return w


def decode_step_workspace(model: int, S: int, longest: int) -> int:
    """The bytes of scratch decode_step needs for S sequences attending to at most
    `longest` tokens."""
    return int(_library().decode_step_workspace(model, S, longest))


def decode_step(model: int, S: int, positions: torch.Tensor, slots: torch.Tensor,
                tables: torch.Tensor, h: torch.Tensor, work: torch.Tensor,
                simd: int | None = None) -> int:
    """decode_step.c over the DecodeModel at address `model` (colocate/worker/cpu_decode.py
    builds it): h (S, hidden) float32 in place; positions, slots (S,) and tables
    (S, max_blocks) int64, contiguous; work: a uint8 scratch buffer of at least
    decode_step_workspace bytes. Returns the C function's status (0: done)."""
    return _library().decode_step(model, S, _ptr(positions), _ptr(slots), _ptr(tables),
                                  tables.shape[1], _ptr(h), _ptr(work), work.numel(),
                                  _body(simd), torch.get_num_threads())
