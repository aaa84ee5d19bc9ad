"""bench/gpu_check.py --dry-run: every step of the GPU run, at toy sizes on the CPU.

The GPU run is rare and short, so the script must work the first time it gets one.
This runs it whole (interpreted kernels, CPU paths, three service processes) and
checks what it wrote, not how fast anything was.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"kernels", "model", "llama13b", "services", "metrics", "traps"}
# What a CPU-only checkout cannot have, each with the reason the script gives.
NOT_AVAILABLE = {"smollm2-gguf": "--gguf", "three-fused-one-process": "fused",
                 "nvml-after-1gib": "GPU"}


def test_dry_run_runs_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    results = report["results"]
    by_name = {r["check"]: r for r in results}
    assert {r["step"] for r in results} == STEPS

    broken = [(r["check"], r.get("error")) for r in results if r["status"] in ("error", "fail")]
    assert broken == []
    unavailable = {r["check"]: r["reason"] for r in results if r["status"] == "not_available"}
    assert unavailable.keys() == NOT_AVAILABLE.keys()
    for check, word in NOT_AVAILABLE.items():
        assert word in unavailable[check], unavailable[check]

    # Correctness figures are real even at toy sizes.
    for r in results:
        if "max_abs_err" in r:
            assert r["max_abs_err"] <= r["tol"], r["check"]
    assert by_name["decode-block-ids-past-int32"]["max_block_id"] * 16 * 16 > 2**31
    assert by_name["kv-write-int8-hd80"]["exact"] and by_name["kv-write-int8-past-2^31"]["exact"]
    assert by_name["tiny-gqa-float-float32"]["tokens_equal"] == by_name[
        "tiny-gqa-float-float32"]["of"]
    assert by_name["float32"]["weights_measured_bytes"] == by_name["float32"][
        "weights_planned_bytes"]
    ipc = by_name["ipc-attach-kill-reuse"]
    assert ipc["checksum_before"] == ipc["checksum_after"]
    assert set(by_name["device-endpoint-memory-by-service"]["memory_used_bytes_by_service"]) >= {
        "chat-a", "chat-b", "chat-c"}
    shared, unshared = by_name["three-shared-one-copy"], by_name["three-unshared"]
    assert shared["three_services"]["requests"] == 3 * shared["one_service_alone"]["requests"]
    assert unshared["store_bytes"] == 3 * shared["store_bytes"]
    hf = by_name["hf-transformers-peer"]
    assert hf["processes"] == 1                            # three on a GPU
    assert hf["all_processes"]["requests"] == hf["one_process_alone"]["requests"] == 1
    assert all(r["spill_store_bytes"] == 0 for r in by_name["decode-registers-spills"]["rows"])

    # The device tool returns at most 8 files: the report is all that goes in --out.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in md and all(r["check"] in md for r in results)
