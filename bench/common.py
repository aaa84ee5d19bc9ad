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
    return bytes_read_per_token(unique_bytes(model.parameters()), embedding, tied)


def unique_bytes(tensors) -> int:
    """Total bytes of `tensors`, a tensor shared by several modules counted once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def bytes_read_per_token(held_bytes: int, embedding: torch.Tensor, tied: bool) -> int:
    """What a batch-1 decode step reads of `held_bytes` of weights (each tensor counted
    once, quantized integers, scales and zeros included): all of it, except the input
    embedding table, of which it reads one row. A tied table is also the lm_head, read
    in full, so then the row comes on top of the table."""
    row = embedding.shape[1] * embedding.element_size()
    if not tied:
        held_bytes -= embedding.numel() * embedding.element_size()
    return held_bytes + row


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


def format_markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same cells as format_table, as a GitHub markdown table (numbers right-aligned)."""
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "".join(" ---: |" if num else " --- |" for num in numeric)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- decode timing shared by the engines of bench/decode.py ------------------------

class StepTimes:
    """A transformers `generate` streamer that only notes when each step's tokens reach
    the host. generate() first hands it the prompt, then one (batch,) tensor per step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def decode_rate(start: float, events: Sequence[tuple[float, int, int]], batch: int
                ) -> dict[str, Any]:
    """Decode tokens/s with prefill left out. `events` are (time, tokens that arrived,
    prompts that have at least one token by then), one per engine step. The clock
    starts when every sequence has its first token (so all prefills, and the first
    sample that comes with them, are behind us) and stops when the last token arrives;
    it counts only the tokens that arrived in between. Timestamps are taken per engine
    step as tokens reach the caller, so engines are timed the same way and any per-step
    overhead (scheduling, sampling, Python) counts, as it would for a user."""
    first = next(i for i, (_, _, started) in enumerate(events) if started == batch)
    window_start = events[first][0]
    later = events[first + 1:]
    if not later:
        raise ValueError("need at least 2 new tokens to time decode")
    tokens = sum(n for _, n, _ in later)
    total = sum(n for _, n, _ in events)
    return {"tokens_per_s": tokens / (later[-1][0] - window_start),
            "decode_tokens": tokens,
            "end_to_end_tokens_per_s": total / (events[-1][0] - start)}
