"""GPU truth in one prepared run: check and measure every CUDA path of colocate.

    python bench/gpu_check.py --out results/gpu [--gguf FILE] [--steps kernels,traps]
    python bench/gpu_check.py --out /tmp/gpu-dry --dry-run       # CPU, toy sizes

Steps, in order (docs/gpu.md lists every check in them):
  kernels   each Triton kernel against torch at real sizes, and timed against torch's own
  model     the whole model through the CUDA path against the CPU path (and HF, GGUF)
  llama13b  a LLaMA-2-13B-shaped model with random weights: tokens/s, TTFT, memory vs plan
  services  three services as plain processes sharing one weight copy (CUDA IPC), and
            three unshared, each against one alone; a metrics scrape of the device
  traps     the things most likely to go wrong on a first GPU run, one check each

Every check is independent: an exception is recorded with its traceback and the next
check runs. A check needing what this checkout or machine lacks (the fused-batching
group, transformers, a GGUF loader) is recorded as not_available, never faked. Results
go to <out>/gpu_check.json and <out>/gpu_check.md, and nothing else goes there (scratch
files live in a temporary folder). No Ray: services are processes.

--dry-run runs the same steps at toy sizes on the CPU (the Triton interpreter, the CPU
paths), so the script itself is tested without a GPU (tests/test_gpu_check.py).
Nothing here asserts a speed; a check fails only on a wrong result.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    # Before any kernel module is imported: Triton decides at decoration time.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()


class NotAvailable(Exception):
    """What a check needs is not in this checkout or on this machine."""


@dataclass
class Ctx:
    """What every check gets: where it runs, how big, and the timing helpers."""
    device: torch.device
    dry: bool
    out: Path                    # the report alone: the device tool returns few files
    work: Path                   # scratch: checkpoints, YAML, launch files
    gguf: Path | None = None
    results: list[dict] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
        """Median milliseconds per call: CUDA events on a GPU, wall time on the CPU
        (where a dry run times one call: the figure only proves the code path)."""
        if self.dry:
            iters, warmup = 1, 0
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        return samples[len(samples) // 2]

    def check(self, step: str, name: str, fn: Callable[[], dict]) -> dict:
        """Run one check; record its result whatever happens.

        fn returns details; "ok": False in them marks a wrong result (a failure)."""
        t0 = time.perf_counter()
        try:
            details = fn() or {}
            status = "ok" if details.pop("ok", True) else "fail"
        except NotAvailable as exc:
            status, details = "not_available", {"reason": str(exc)}
        except Exception as exc:        # recorded, and the next check still runs
            status = "error"
            details = {"error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc(limit=8)}
        if self.cuda:
            torch.cuda.empty_cache()
        result = {"step": step, "check": name, "status": status,
                  "seconds": round(time.perf_counter() - t0, 3), **details}
        self.results.append(result)
        print(f"[{status:>13}] {step}/{name} ({result['seconds']:.1f} s)", flush=True)
        return result


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max()) if got.numel() else 0.0


def machine() -> dict:
    import platform

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def write_report(ctx: Ctx, info: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "gpu_check.json").write_text(json.dumps(
        {"machine": info, "dry_run": ctx.dry, "results": ctx.results}, indent=1, default=str))
    counts: dict[str, int] = {}
    for r in ctx.results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"# gpu_check {'(dry run, CPU, toy sizes)' if ctx.dry else ''}", "",
             "machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
             "summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), "",
             "| step | check | status | s | details |", "| --- | --- | --- | --- | --- |"]
    for r in ctx.results:
        shown = {k: v for k, v in r.items()
                 if k not in ("step", "check", "status", "seconds", "traceback")}
        text = json.dumps(shown, default=str)
        lines.append(f"| {r['step']} | {r['check']} | {r['status']} | {r['seconds']} | "
                     f"{text[:600].replace('|', '/')} |")
    (ctx.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    # Run as a script this module is __main__; the steps import it as gpu_check, and
    # must get this same module (one NotAvailable class, not two).
    sys.modules.setdefault("gpu_check", sys.modules[__name__])
    import gpu_check_kernels
    import gpu_check_model
    import gpu_check_services
    import gpu_check_traps

    steps = {"kernels": gpu_check_kernels.run, "model": gpu_check_model.run_model,
             "llama13b": gpu_check_model.run_llama13b, "services": gpu_check_services.run,
             "traps": gpu_check_traps.run}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the JSON and markdown")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, interpreter")
    ap.add_argument("--steps", default=",".join(steps), help="comma-separated subset")
    ap.add_argument("--gguf", type=Path, help="a GGUF file for the model step (SmolLM2)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --dry-run, or on a GPU machine")
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Ctx(torch.device("cpu" if args.dry_run else "cuda:0"), args.dry_run, args.out,
              work, args.gguf)
    info = machine()
    began = time.perf_counter()
    for name in args.steps.split(","):
        try:
            steps[name](ctx)
        except Exception:               # a step's own setup failed: record, go on
            ctx.results.append({"step": name, "check": "(setup)", "status": "error",
                                "seconds": 0, "traceback": traceback.format_exc(limit=8)})
        write_report(ctx, info)         # after every step: a killed run keeps what it had
    info["total_seconds"] = round(time.perf_counter() - began, 1)
    write_report(ctx, info)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {ctx.out / 'gpu_check.json'} and gpu_check.md "
          f"({info['total_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
