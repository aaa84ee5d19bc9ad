"""Helpers shared by the benchmarks: timing, memory bandwidth, weight bytes, tables, JSON.

Benchmarks print a table and write JSON; they never assert anything about speed,
because the machines they run on are shared and their numbers are noisy.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# Larger than any L3 we run on (32 MB here) by a wide margin, so a sum streams from DRAM.
DEFAULT_BANDWIDTH_BYTES = 256 * 2**20


def time_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run fn once; return its result and the wall-clock seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def repeat_times(fn: Callable[[int], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call for `repeats` calls of fn(i), after `warmup` untimed calls (first
    calls pay for allocation, lazy init and oneDNN primitive creation, which is not what
    we want to measure). fn gets the call's index, warm-ups first, so a caller can feed
    every call fresh inputs."""
    for i in range(warmup):
        fn(i)
    return [time_call(lambda: fn(warmup + i))[1] for i in range(repeats)]


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median first: on a shared machine the mean is dragged by whoever else ran."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": list(samples)}


def measure_read_bandwidth(nbytes: int = DEFAULT_BANDWIDTH_BYTES, repeats: int = 7
                           ) -> dict[str, Any]:
    """Read bandwidth in bytes/s: the median time of `sum()` over an fp32 tensor of
    `nbytes`, with torch's current thread count. A sum reads every byte once and does
    one add per element, so it is bound by memory, not arithmetic."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    times = repeat_times(lambda _: x.sum(), repeats, warmup=2)
    del x
    return {"bytes_per_s": nbytes / statistics.median(times), "tensor_bytes": nbytes,
            "threads": torch.get_num_threads(), "seconds": times}


def weight_bytes_per_token(model: torch.nn.Module, embedding: torch.Tensor, tied: bool) -> int:
    """Parameter bytes a batch-1 decode step must read: every weight once, except the
    input embedding, of which a step reads one row. With tied embeddings the same table
    is the lm_head, read in full, so the row is counted on top of the full table.
    Parameters shared by several modules are counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    row = embedding.shape[1] * embedding.element_size()
    if not tied:
        total -= embedding.numel() * embedding.element_size()
    return total + row


def machine_info() -> dict[str, Any]:
    info = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": _cpu_model(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        import transformers
        info["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: text left-aligned, numbers right-aligned, None shown as '-'."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
