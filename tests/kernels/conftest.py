"""Kernel tests run the Triton kernels on CPU through the interpreter.

Triton decides at decoration time (when a kernel module is imported) whether a kernel
is compiled or interpreted, reading TRITON_INTERPRET then. So it is set here, before
any test module in this folder imports colocate.kernels; and if an earlier test
folder already imported kernel modules compiled, they are reloaded so their
decorators run again under the interpreter. The last lines check that it worked.
"""
from __future__ import annotations

import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PACKAGE = "colocate.kernels"


def _kernel_modules() -> list[str]:
    """Loaded modules of the package: shared helpers (_name) first, the package last,
    so each module rebinds helpers that were already reloaded."""
    names = [n for n in sys.modules if n.startswith(PACKAGE + ".")]
    return sorted(names, key=lambda n: (not n.rsplit(".", 1)[1].startswith("_"), n)) + [PACKAGE]


def _compiled_kernels() -> list[str]:
    return [f"{n}.{a}" for n in _kernel_modules() if n in sys.modules
            for a, v in vars(sys.modules[n]).items() if isinstance(v, JITFunction)]


if _compiled_kernels():
    for _name in _kernel_modules():
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
importlib.import_module(PACKAGE)
for _name in ("reshape_and_cache", "merge_attention_partitions", "paged_decode_attention",
              "paged_prefill_attention"):
    importlib.import_module(f"{PACKAGE}.{_name}")
assert not _compiled_kernels(), f"compiled, not interpreted: {_compiled_kernels()}"
assert isinstance(sys.modules[f"{PACKAGE}.paged_decode_attention"]._paged_decode_kernel,
                  InterpretedFunction)
