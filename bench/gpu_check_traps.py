"""gpu_check step 6: the traps most likely on a first GPU run, one check each.

IPC weights surviving a killed consumer and a reused allocator; registers, spills and
achieved KV bandwidth of decode at Llama-3-8B / 70B shapes; compiled fp16 / bf16
numerics of every kernel (the interpreter runs bf16 dots in fp32); a 4k fresh prefill
and a mixed batch; the quantized matmuls at M = 1, 16, 4096; the int8 KV write at
head sizes that are not a power of two and past 2**31 elements; NVML after a 1 GiB
allocation; first-call JIT against steady state; host launch overhead of a 32-layer
decode step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check import Ctx, NotAvailable
from gpu_check_kernels import (attention_check, kv_write_check, make_paged, matmul_check,
                               run_decode)
from gpu_check_services import Child

HERE = Path(__file__).resolve().parent


def ipc_survivor_check(ctx: Ctx) -> dict:
    """Two processes attach one published model; one is killed; the exporter's
    allocator is then made to reuse freed memory; the survivor's weights must be the
    same bytes as before."""
    from colocate.memory.weight_store import WeightStore
    from colocate.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(ctx.work / "models" / "tiny-ipc", preset="tiny", seed=1)
    store = WeightStore(str(ctx.device) if ctx.cuda else "cpu")
    a = b = None
    try:
        store.publish("tiny", path)
        shares = [store.share("tiny"), store.share("tiny")]
        a = Child("weights", shares[0], ctx.work, "ipc-a")
        b = Child("weights", shares[1], ctx.work, "ipc-b")
        before = b.ready["checksum"]
        assert a.ready["checksum"] == before
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait()
        store.end_share(shares[0])
        if ctx.cuda:
            # Churn the caching allocator: blocks freed anywhere in this process would
            # now be handed out and overwritten.
            junk = [torch.full((64 * 2**20,), 255, dtype=torch.uint8, device=ctx.device)
                    for _ in range(8)]
            del junk
            torch.cuda.synchronize()
        after = b.ask("sum")["checksum"]
        return {"checksum_before": before, "checksum_after": after, "ok": before == after,
                "leases_left": store.cuda.leases("tiny")}
    finally:
        for child in (a, b):
            if child is not None:
                child.stop()
        store.close()


def registers_check(ctx: Ctx) -> dict:
    """ptxas figures of decode for this GPU's architecture (sm_90 on a dry run),
    compiled in a process of its own (the kernels must be compiled, not interpreted)."""
    arch = "".join(map(str, torch.cuda.get_device_capability())) if ctx.cuda else "90"
    cases = "decode-fp16-g4,decode-fp16-g8,decode-int8-g8" if not ctx.dry else "decode-fp16-g8"
    out = ctx.work / "kernel_resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(HERE / "kernel_resources.py"), "--arch", arch,
                    "--cases", cases, "--out", str(out)], check=True, env=env,
                   capture_output=True, timeout=600)
    rows = json.loads(out.read_text())
    return {"rows": rows, "ok": all(r["spill_store_bytes"] == 0 for r in rows)}


def kv_bandwidth_check(ctx: Ctx, nh: int, nkv: int, context: int) -> dict:
    """Achieved bytes/s of decode reading the cache: every sequence's K and V once."""
    S = 2 if ctx.dry else 32
    hd = 16 if ctx.dry else 128
    if ctx.dry:
        nh, nkv, context = 4, 2, 40
    dtype = torch.float32 if ctx.dry else torch.float16
    p = make_paged(ctx, [context] * S, [1] * S, nh, nkv, hd, dtype, "auto")
    ms = ctx.time_ms(lambda: run_decode(p, hd ** -0.5))
    kv_bytes = 2 * S * context * nkv * hd * p.key_cache.element_size()
    return {"ms": ms, "kv_bytes": kv_bytes, "gb_per_s": kv_bytes / ms / 1e6}


def first_call_check(ctx: Ctx) -> dict:
    """A kernel specialization not seen before (hd 64): first call against steady state."""
    hd, dtype = (16, torch.float32) if ctx.dry else (64, torch.float16)
    p = make_paged(ctx, [40 if ctx.dry else 300], [1], 8, 2, hd, dtype, "auto", seed=9)
    t0 = time.perf_counter()
    run_decode(p, hd ** -0.5)
    ctx.sync()
    first = (time.perf_counter() - t0) * 1e3
    return {"first_call_ms": first, "steady_ms": ctx.time_ms(lambda: run_decode(p, hd ** -0.5))}


def nvml_check(ctx: Ctx) -> dict:
    from colocate.memory.probe import cuda_process_memory

    if not ctx.cuda:
        raise NotAvailable("NVML needs a GPU (tests/memory/test_cuda_devices.py covers the "
                           "logic with a fake)")
    before = cuda_process_memory("cuda:0", [os.getpid()])
    block = torch.empty(2**30, dtype=torch.uint8, device=ctx.device)
    block.fill_(1)
    torch.cuda.synchronize()
    after = cuda_process_memory("cuda:0", [os.getpid()])
    del block
    mine = after.by_pid.get(os.getpid(), 0) - before.by_pid.get(os.getpid(), 0)
    grew = after.device_used - before.device_used
    return {"per_process_known": after.per_process, "note": after.note,
            "this_process_grew_by": mine, "device_grew_by": grew,
            "ok": grew >= 2**30 * 0.99 and (not after.per_process or mine >= 2**30 * 0.99)}


def launch_overhead_check(ctx: Ctx) -> dict:
    """A 32-layer decode step (narrow layers, so the GPU time is small): host wall time
    against CUDA-event time of the same forward."""
    from colocate.model.attention_metadata import AttentionMetadata
    from colocate.model.llama import allocate_kv_caches
    from gpu_check_model import random_model

    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 32 if not ctx.dry else 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "float16"}
    path = ctx.work / "models" / "overhead"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    dtype = torch.float32 if ctx.dry else torch.float16
    model, config = random_model(path, ctx.device, dtype, None, 128)
    S, ctx_len, bs = 8, 64, 16
    caches = allocate_kv_caches(config, S * ctx_len // bs + 1, bs, dtype=dtype,
                                device=ctx.device)
    table = torch.arange(1, S * ctx_len // bs + 1, device=ctx.device).view(S, -1)
    pos = torch.full((S,), ctx_len - 1, device=ctx.device)
    slots = table[:, -1] * bs + (ctx_len - 1) % bs
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=list(range(S + 1)),
                             seq_lens=[ctx_len] * S, block_tables=table, block_size=bs,
                             all_decode=True)
    ids = torch.arange(S, device=ctx.device)
    step = lambda: model(ids, pos, caches, meta)                             # noqa: E731
    with torch.no_grad():
        gpu_ms = ctx.time_ms(step)
        ctx.sync()
        t0 = time.perf_counter()
        reps = 1 if ctx.dry else 20
        for _ in range(reps):
            step()
        ctx.sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / reps
    return {"layers": raw["num_hidden_layers"], "wall_ms": wall_ms, "device_ms": gpu_ms}


def run(ctx: Ctx) -> None:
    ctx.check("traps", "ipc-attach-kill-reuse", lambda: ipc_survivor_check(ctx))
    ctx.check("traps", "decode-registers-spills", lambda: registers_check(ctx))
    for nh, nkv, label in ((32, 8, "llama3-8b"), (64, 8, "llama3-70b")):
        for context in (2048, 32768):
            ctx.check("traps", f"decode-kv-bandwidth-{label}-{context // 1024}k",
                      lambda: kv_bandwidth_check(ctx, nh, nkv, context))
    f16 = [torch.float32] if ctx.dry else [torch.float16, torch.bfloat16]
    hd = 16 if ctx.dry else 128
    heads = (4, 2) if ctx.dry else (32, 8)
    long = 40 if ctx.dry else 300
    for dtype in f16:
        name = str(dtype).removeprefix("torch.")
        ctx.check("traps", f"compiled-{name}-decode",
                  lambda: attention_check(ctx, "decode", [5, long], [1, 1], *heads, hd, dtype, "auto"))
        ctx.check("traps", f"compiled-{name}-prefill",
                  lambda: attention_check(ctx, "prefill", [5, long], [5, long], *heads, hd, dtype,
                                          "auto"))
        ctx.check("traps", f"compiled-{name}-w8a16",
                  lambda: matmul_check(ctx, 8, 16, 256, 512 if not ctx.dry else 64, dtype, 32))
        ctx.check("traps", f"compiled-{name}-w4a16",
                  lambda: matmul_check(ctx, 4, 16, 256, 512 if not ctx.dry else 64, dtype, 32))
    n4k = 40 if ctx.dry else 4096
    dt = torch.float32 if ctx.dry else torch.float16
    ctx.check("traps", "prefill-4k-fresh",
              lambda: attention_check(ctx, "prefill", [n4k], [n4k], *heads, hd, dt, "auto"))
    chunk, decodes, past = (12, 5, 20) if ctx.dry else (512, 63, 200)
    ctx.check("traps", "prefill-mixed-chunk-and-decodes",
              lambda: attention_check(ctx, "prefill", [chunk + past] + [past] * decodes,
                                      [chunk] + [1] * decodes, *heads, hd, dt, "auto"))
    n, k = (48, 64) if ctx.dry else (5120, 5120)
    for m in ([1, 3] if ctx.dry else [1, 16, 4096]):
        for bits in (8, 4):
            ctx.check("traps", f"w{bits}a16-m{m}-vs-dequantized",
                      lambda: matmul_check(ctx, bits, m, n, k, dt, 32 if ctx.dry else 128))
    for head_dim in (80, 96):
        ctx.check("traps", f"kv-write-int8-hd{head_dim}",
                  lambda: kv_write_check(ctx, 33, 2, head_dim, dt, "int8"))
    ctx.check("traps", "kv-write-int8-past-2^31",
              lambda: kv_write_check(ctx, 9, 1, 16 if ctx.dry else 128, dt, "int8", high=True))
    ctx.check("traps", "nvml-after-1gib", lambda: nvml_check(ctx))
    ctx.check("traps", "first-call-jit-vs-steady", lambda: first_call_check(ctx))
    ctx.check("traps", "launch-overhead-32-layer-decode", lambda: launch_overhead_check(ctx))
