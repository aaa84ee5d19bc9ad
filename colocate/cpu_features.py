"""What this CPU can do, read at run time: its model, the vector flags that matter to
torch's CPU kernels, and the ATen capabilities it can run.

The machines this project meets differ (AVX2-only Zen 3, AVX-512 + BF16 + VNNI Zen 4,
AMX on recent Xeons), so nothing may assume the developer's. torch dispatches its
vectorized kernels by capability (DEFAULT < AVX2 < AVX512), and the environment
variable ATEN_CPU_CAPABILITY lowers it for one process; torch does not check that the
CPU has what the variable asks for, so only capabilities listed by `runnable()` are
safe to set. `python -m colocate.cpu_features` prints the report (CI logs start with
it); `--other-capabilities` prints the runnable capabilities other than the native
one, which `make test` runs the layout-sensitive tests under.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags reported, in the order printed. amx_* appear on Sapphire Rapids and later.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                  "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16",
                  "amx_int8")
# What torch's AVX512 kernels are compiled for (its cmake: -mavx512f -mavx512bw
# -mavx512vl -mavx512dq); AVX2's are built with -mavx2 -mfma.
_CAPABILITY_FLAGS = {"default": (), "avx2": ("avx2", "fma"),
                     "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}
CAPABILITY_ENV = "ATEN_CPU_CAPABILITY"


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def runnable(self) -> list[str]:
        """ATen capabilities this CPU can execute, lowest first."""
        return [cap for cap, needs in _CAPABILITY_FLAGS.items()
                if all(f in self.flags for f in needs)]


def read(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """The first processor's model name and flags (all cores of a VM report the same)."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return CpuFeatures(fields.get("model name") or platform.processor() or "unknown",
                       frozenset(fields.get("flags", "").split()))


def torch_capability() -> str:
    """The capability torch dispatches to in this process ('DEFAULT', 'AVX2', 'AVX512')."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_bf16_matmul(features: CpuFeatures | None = None) -> bool:
    """Whether bf16 matrix products run in hardware here: AMX or AVX512_BF16 units.
    oneDNN, which takes torch's bf16 products, picks its code from the CPU itself, not
    from torch's dispatch level: measured on a Zen 4 under ATEN_CPU_CAPABILITY=avx2,
    256 x 576 -> 3072 in bf16 3.1 ms against 9.2 in float32. On a CPU without the units
    bf16 is emulated, 5-7x slower than float32."""
    features = features or read()
    return features.has("amx_bf16") or features.has("avx512_bf16")


def native_bf16_attention(features: CpuFeatures | None = None) -> bool:
    """Whether torch's bf16 flash attention runs here: wherever bf16 products do, but
    with AMX tiles only at torch's AVX512 level (its AMX path packs with AVX-512 and
    refuses below it: "pack_vnni2 is only supported when avx512 is supported", seen on
    an AMX Xeon under ATEN_CPU_CAPABILITY=avx2)."""
    features = features or read()
    return native_bf16_matmul(features) and (torch_capability() == "AVX512"
                                             or not features.has("amx_bf16"))


# The precision of a CPU prefill's dequantized products and attention: "float32"
# (exact), or "bfloat16" (inputs rounded to bf16, float32 accumulation: what HF's bf16
# mode computes), which "auto", the default, takes where bf16 products run in hardware.
PREFILL_ENV = "COLOCATE_CPU_PREFILL"
_PREFILL_CHOICES = ("auto", "float32", "bfloat16")


def prefill_dtype():
    """The dtype a quantized CPU model's prefill computes in, here and now (torch.dtype)."""
    import torch

    choice = os.environ.get(PREFILL_ENV, "auto")
    if choice not in _PREFILL_CHOICES:
        raise ValueError(f"{PREFILL_ENV}={choice!r}: expected 'auto', 'float32' or 'bfloat16'")
    if choice == "auto":
        choice = "bfloat16" if _native_bf16_here() else "float32"
    return getattr(torch, choice)


@functools.lru_cache(maxsize=1)
def amx_bf16_here() -> bool:
    """Whether this CPU has AMX bf16 tiles (read once: it is fixed for the process)."""
    return read().has("amx_bf16")


def prefill_attention_dtype():
    """The dtype a quantized CPU model's prefill attention computes in: the products'
    (prefill_dtype), unless that is bf16 where torch's bf16 attention cannot run."""
    import torch

    products = prefill_dtype()
    if products == torch.bfloat16 and not _native_bf16_attention_here():
        return torch.float32
    return products


@functools.lru_cache(maxsize=1)
def _native_bf16_here() -> bool:
    """native_bf16_matmul() of this CPU, read once (fixed for the process's life)."""
    return native_bf16_matmul()


@functools.lru_cache(maxsize=1)
def _native_bf16_attention_here() -> bool:
    """native_bf16_attention() of this process, read once (the CPU and torch's level
    are fixed for its life)."""
    return native_bf16_attention()


def report(features: CpuFeatures) -> str:
    present = " ".join(f"{f}={'yes' if features.has(f) else 'no'}" for f in REPORTED_FLAGS)
    return (f"cpu: {features.model}\n"
            f"cpu flags: {present}\n"
            f"torch capability: {torch_capability()} "
            f"(runnable here: {', '.join(features.runnable())})")


def other_capabilities(features: CpuFeatures) -> list[str]:
    native = torch_capability().lower()
    return [cap for cap in features.runnable() if cap != native]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m colocate.cpu_features")
    parser.add_argument("--other-capabilities", action="store_true",
                        help="print the runnable ATen capabilities other than the native one")
    args = parser.parse_args(argv)
    features = read()
    if args.other_capabilities:
        print(" ".join(other_capabilities(features)))
    else:
        print(report(features))


if __name__ == "__main__":
    main()
