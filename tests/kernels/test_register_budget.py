"""Registers and spills of the decode attention kernels, compiled offline for sm_80 and
sm_90 (no GPU needed; see bench/kernel_resources.py).

The broadcast-multiply decode this replaced used 255 registers and spilled about
880 bytes per thread on sm_80 at hd 128 with a GQA group of 8 (1 KB with an int8
cache), measured here with Triton 3.9's ptxas. The tl.dot version uses 80-136 and
spills nothing; the bound below (168) still leaves three 4-warp programs per SM.
The kernels are compiled, not interpreted, so this runs in its own process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = ["decode-fp16-g1", "decode-fp16-g8", "decode-int8-g1", "decode-int8-g8",
         "decode-bf16-g8"]
PREFILL = ["prefill-fp16-g8", "prefill-int8-g4"]


def test_decode_kernels_fit_in_registers(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py"),
                    "--arch", "80,90", "--cases", ",".join(CASES + PREFILL), "--out", str(out)],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    seen = {(r["case"], r["kernel"], r["arch"]) for r in rows}
    for case in CASES:
        for arch in (80, 90):
            assert (case, "_paged_decode_kernel", arch) in seen
            assert (case, "_merge_partitions_kernel", arch) in seen   # every case splits
    for case in PREFILL:
        assert (case, "_paged_prefill_kernel", 90) in seen
    for r in rows:
        where = f"{r['case']} {r['kernel']} sm_{r['arch']}"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, where
        assert 0 < r["registers"] <= 168, where


DIVISIONS = r"""
import re, sys
sys.path.insert(0, "bench")
import kernel_resources as kr
with kr.recorded_launches(kr.KERNEL_MODULES) as launches:
    kr.CASES["kv-write-int8-hd80"]()
ptx = kr.compile_launch(launches[0], 90).asm["ptx"]
print(" ".join(sorted(set(re.findall(r"div\.[a-z0-9.]+\.f32", ptx)))))
"""


def test_int8_kv_write_divides_exactly_when_compiled():
    """fp32 `/` compiles to div.approx / div.full; the int8 codes must equal
    quantize_kv's, which divides in IEEE, so the kernel uses div_rn (div.rn.f32)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", DIVISIONS], check=True, env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600).stdout.split()
    assert out == ["div.rn.f32"]
