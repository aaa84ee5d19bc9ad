"""gpu_check steps 4 and 5: three services on one device, as plain processes (no Ray).

The A100 example's three int4 services (deploy/examples/a100-3x-llama2-13b.yaml), KV
budgets scaled to an H200's memory, on a LLaMA-2-13B-shaped model with random weights:
  - shared: one weight copy, mapped by every service through CUDA IPC (CPU: /dev/shm);
  - fused: one process for all three (the fused-batching issue; not in this checkout);
  - unshared: a copy per service.
Per layout: device memory per process and in all (NVML on a GPU, PSS on the CPU)
against the plan, and mean TTFT / ITL / E2E with one request in flight per service
against one service alone. Then a scrape of the device's metrics endpoint, built from
the same pieces the supervisor uses, showing memory per service.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from gpu_check import Ctx, NotAvailable
from gpu_check_model import llama13b_config

HERE = Path(__file__).resolve().parent
TOKEN_ENV, TOKEN = "GPU_CHECK_TOKEN", "gpu-check-token"
NAMES = ("chat-a", "chat-b", "chat-c")


def deployment_yaml(ctx: Ctx, share: bool) -> Path:
    """The A100 example's three services; 34 GiB KV each on a 139 GiB H200 is its 20 GiB
    on 80 GB scaled, less what three unshared int4 copies (3 x 7.4 GB) need."""
    path = llama13b_config(ctx)
    budget = "256KiB" if ctx.dry else "30GiB"
    device = "cpu" if ctx.dry else "cuda:0"
    memory = "" if ctx.dry else "    memory: 139GiB\n"
    quant = "quantization: int4, quant_group_size: 32" if ctx.dry else \
        "quantization: int4, quant_group_size: 128"
    dtype = "float32" if ctx.dry else "float16"
    services = "".join(
        f"      - name: {n}\n        model: llama2-13b\n        port: {free_port()}\n"
        f"        max_model_len: 4096\n        kv_cache: {{dtype: int8, budget: {budget}}}\n"
        f"        tenants: [{{name: team-{n}, token_env: {TOKEN_ENV}}}]\n" for n in NAMES)
    yaml = ctx.work / f"services-{'shared' if share else 'unshared'}.yaml"
    yaml.write_text(f"models:\n  llama2-13b: {{path: {path}, dtype: {dtype}, {quant}}}\n"
                    f"gpus:\n  - device: {device}\n{memory}    share_weights: {str(share).lower()}\n"
                    f"    headroom: 0\n    services:\n{services}")
    return yaml


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_reader(device: torch.device):
    """A float reader for WeightStore.publish that makes random tensors on `device`
    (on a GPU the quantization then runs there too, in seconds instead of minutes)."""
    from colocate.model.checkpoint import hf_tensor_shapes

    def read(_path, cfg, dt, _where):
        gen = torch.Generator(device=device).manual_seed(0)
        return {n: (torch.ones(s, device=device, dtype=dt) if "norm" in n else
                    (torch.randn(s, generator=gen, device=device) * 0.02).to(dt))
                for n, s in hf_tensor_shapes(cfg).items()}
    return read


class Child:
    """One gpu_check_child.py process, driven over its pipes."""

    def __init__(self, mode: str, payload, workdir: Path, name: str):
        blob = workdir / f"{name}.pkl"
        blob.write_bytes(pickle.dumps(payload))
        env = {**os.environ, TOKEN_ENV: TOKEN}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "gpu_check_child.py"), mode,
                                      str(blob)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.pid = self.proc.pid
        self._ready: dict | None = None

    @property
    def ready(self) -> dict:
        """Its first line; children started together get ready in parallel."""
        if self._ready is None:
            self._ready = self.read()
        return self._ready

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited with {self.proc.wait()} before answering")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def one_request_each(ports: list[int], prompt_len: int, new_tokens: int,
                     repeats: int) -> dict[str, float]:
    """Every port gets `repeats` requests, one at a time, all ports at once; mean ms."""
    from colocate.client import Client

    ttft, itl, e2e = [], [], []
    lock = threading.Lock()

    def worker(port: int):
        with Client(f"127.0.0.1:{port}", TOKEN) as client:
            for r in range(repeats):
                t0 = time.perf_counter()
                stamps = []
                for delta in client.generate(list(range(2 + r, 2 + r + prompt_len)),
                                             max_tokens=new_tokens, temperature=0.0,
                                             ignore_eos=True):
                    if delta.token_ids:
                        stamps.append(time.perf_counter())
                with lock:
                    ttft.append((stamps[0] - t0) * 1e3)
                    e2e.append((stamps[-1] - t0) * 1e3)
                    itl.extend((b - a) * 1e3 for a, b in zip(stamps, stamps[1:]))
    threads = [threading.Thread(target=worker, args=(p,)) for p in ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ttft_ms": statistics.mean(ttft), "itl_ms": statistics.mean(itl) if itl else 0.0,
            "e2e_ms": statistics.mean(e2e), "requests": len(e2e)}


def measured_memory(ctx: Ctx, pids: list[int]) -> dict:
    from colocate.memory.probe import cuda_process_memory, device_process_memory

    if ctx.cuda:
        reading = cuda_process_memory("cuda:0", pids)
        return {"per_process": reading.by_pid, "device_used": reading.device_used,
                "per_process_known": reading.per_process, "note": reading.note}
    return {"per_process": device_process_memory("cpu", pids), "per_process_known": True}


def layout_check(ctx: Ctx, share: bool, scrape: dict) -> dict:
    from colocate.config import load_config
    from colocate.memory.arbiter import MemoryArbiter
    from colocate.memory.weight_store import WeightStore
    from colocate.cluster.launch import prepare_launches

    os.environ[TOKEN_ENV] = TOKEN
    config = load_config(deployment_yaml(ctx, share))
    gpu = config.gpus[0]
    arbiter = MemoryArbiter.for_device(gpu, config)
    for s in gpu.services:
        arbiter.admit(s)
    demands = {d.service: d for d in arbiter.admitted()}
    store = WeightStore("cpu" if ctx.dry else "cuda:0")
    model = config.models["llama2-13b"]
    reader = random_reader(ctx.device)
    for name in (["llama2-13b"] if share else [f"llama2-13b@{n}" for n in NAMES]):
        # Published here with random weights; prepare_launches' publish is then a repeat.
        store.publish(name, model.path, model.dtype, quantization=model.quantization,
                      quant_group_size=model.quant_group_size, read_float=reader)
    if ctx.cuda:
        # The float tensors the random weights were made from sit in this process's
        # caching allocator; hand them back before the services allocate their pools.
        torch.cuda.empty_cache()
    launches = prepare_launches(gpu, config, store, demands, device=str(ctx.device),
                                host="127.0.0.1", torch_threads=1,
                                tenants={n: {TOKEN: f"team-{n}"} for n in NAMES})
    children = []
    try:
        for launch in launches:
            children.append(Child("service", launch, ctx.work, f"launch-{launch.spec.name}"))
        ports = [c.ready["port"] for c in children]            # waits for all three
        plen, new, reps = (8, 4, 1) if ctx.dry else (128, 64, 3)
        alone = one_request_each(ports[:1], plen, new, reps)
        together = one_request_each(ports, plen, new, reps)
        memory = measured_memory(ctx, [os.getpid()] + [c.pid for c in children])
        if share and scrape is not None:
            scrape.update(scrape_metrics(ctx, gpu, config, arbiter, store, children))
        return {"one_service_alone": alone, "three_services": together, "memory": memory,
                "planned_reserved_bytes": arbiter.reserved_bytes,
                "planned_weight_copies": 1 if share else 3,
                "store_bytes": store.total_bytes()}
    finally:
        for c, launch in zip(children, launches):
            c.stop()
            store.end_share(launch.weights)
        store.close()


def scrape_metrics(ctx: Ctx, gpu, config, arbiter, store, children) -> dict:
    """/metrics of the device, served by MetricsEndpoint over a DeviceSample made from
    the services' own reports (what the supervisor does, without Ray)."""
    from colocate.metrics.device import device_sample
    from colocate.metrics.endpoint import MetricsEndpoint

    reports = {}
    for child, spec in zip(children, gpu.services):
        report = pickle.loads(base64.b64decode(child.ask("metrics")["metrics"]))
        reports[spec.name] = (report, 0)
    local = "cpu" if ctx.dry else "cuda:0"
    endpoint = MetricsEndpoint(lambda: device_sample(gpu, config, arbiter, store, local,
                                                     reports))
    try:
        text = urllib.request.urlopen(endpoint.url, timeout=30).read().decode()
    finally:
        endpoint.stop()
    used = {}
    for line in text.splitlines():
        if line.startswith("colocate_memory_used_bytes{"):
            labels, value = line.rsplit(" ", 1)
            service = labels.split('service="', 1)[1].split('"', 1)[0]
            used[service] = float(value)
    return {"memory_used_bytes_by_service": used,
            # Per service where NVML can name the processes; else the device total alone.
            "ok": all(used.get(n, 0) > 0 for n in NAMES) or used.get("_device", 0) > 0}


def hf_peer_check(ctx: Ctx) -> dict:
    """HF transformers on the same device, one process per service, one request in
    flight each: TTFT from a one-token generate, ITL from the rest of a longer one."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise NotAvailable("transformers is not installed here") from None
    spec = {"device": str(ctx.device), "dtype": "float32" if ctx.dry else "float16",
            "config_dir": str(llama13b_config(ctx))}
    plen, new, reps = (8, 4, 1) if ctx.dry else (128, 64, 2)
    # A dry run starts one peer: three transformers imports cost 40 s on two cores.
    children = [Child("hf", spec, ctx.work, f"hf-{n}") for n in NAMES[:1 if ctx.dry else 3]]
    try:
        pids = [c.ready["pid"] for c in children]                 # waits for all three

        def measure(group):
            rows = []
            for _ in range(reps):
                for c in group:
                    c.proc.stdin.write(f"run {plen} {new}\n")
                    c.proc.stdin.flush()
                rows += [c.read() for c in group]                 # all in flight at once
            ttft = statistics.mean(r["ttft_ms"] for r in rows)
            e2e = statistics.mean(r["e2e_ms"] for r in rows)
            return {"ttft_ms": ttft, "itl_ms": (e2e - ttft) / max(1, new - 1), "e2e_ms": e2e,
                    "requests": len(rows)}
        alone = measure(children[:1])
        together = measure(children)
        return {"one_process_alone": alone, "all_processes": together,
                "processes": len(children),
                "memory": measured_memory(ctx, pids), "weights": "fp16, unquantized"
                if not ctx.dry else "fp32"}
    finally:
        for c in children:
            c.stop()


def run(ctx: Ctx) -> None:
    scrape: dict = {}
    ctx.check("services", "three-shared-one-copy", lambda: layout_check(ctx, True, scrape))

    def fused():
        raise NotAvailable("batching: fused (one process for the three services) is the "
                           "fused-batching issue's work and is not in this checkout")
    ctx.check("services", "three-fused-one-process", fused)
    ctx.check("services", "three-unshared", lambda: layout_check(ctx, False, None))

    ctx.check("services", "hf-transformers-peer", lambda: hf_peer_check(ctx))

    def metrics():
        if not scrape:
            raise NotAvailable("the shared-services check did not get as far as a scrape")
        return dict(scrape)
    ctx.check("metrics", "device-endpoint-memory-by-service", metrics)
