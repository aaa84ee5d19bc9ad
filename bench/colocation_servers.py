"""The servers' side of bench/colocation.py: the deployments each scenario runs, how
they are started and stopped, and the memory they hold.

alone, shared, fused and unshared are all cut from one device entry of one config, so
they differ in exactly one thing each: alone keeps only the first service; fused sets
`batching: fused`; unshared sets `share_weights: false`. The peer scenario's servers
are in colocation_peers.py.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import psutil

from colocate.config import DeploymentConfig
from colocate.memory.probe import device_process_memory
from colocate.cluster.deploy import Deployment, load_with_demo_tokens
from colocation_load import ColocateTarget, OpenAITarget, Target

SCENARIOS = ("alone", "shared", "fused", "unshared", "peer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_default_config(path: Path, model: str, services: int, *, kv_tokens: int,
                         max_model_len: int, max_num_seqs: int) -> Path:
    """The CPU deployment the benchmark runs by default: `services` identical services
    of one model (unlike the demo's, whose third service has an int8 KV cache, so that
    every tenant of `shared` is comparable to `alone`), on free ports."""
    body = "".join(f"""
      - name: svc-{i}
        model: m
        port: {free_port()}
        max_model_len: {max_model_len}
        kv_cache: {{dtype: auto, tokens: {kv_tokens}}}
        max_num_seqs: {max_num_seqs}
        max_num_batched_tokens: 512
        tenants: [{{name: tenant-{i}, token_env: BENCH_TOKEN_{i}}}]""" for i in range(services))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# written by bench/colocation.py
models:
  m: {{path: "{model}", dtype: float32}}
gpus:
  - device: cpu
    share_weights: true
    services:{body}
""")
    return path


def with_http_ports(config: DeploymentConfig) -> DeploymentConfig:
    """The first device entry's services, each with an HTTP door (a free port unless set)."""
    gpu = config.gpus[0]
    services = tuple(s if s.http_port is not None else replace(s, http_port=free_port())
                     for s in gpu.services)
    return replace(config, gpus=(replace(gpu, services=services), *config.gpus[1:]))


def load_bench_config(path: str | Path) -> DeploymentConfig:
    """The YAML with a made-up token for every tenant variable that is unset: the
    benchmark is the only client of the servers it starts, and they die with it."""
    return load_with_demo_tokens(Path(path))[0]


def scenario_configs(config: DeploymentConfig) -> dict[str, DeploymentConfig]:
    """alone / shared / fused / unshared from the first device entry. The metrics
    endpoint gets a free port, so a `colocate serve` running beside the benchmark is
    no clash."""
    gpu = replace(config.gpus[0], metrics_port=None)
    one = lambda g: replace(config, gpus=(g,))          # noqa: E731
    return {"alone": one(replace(gpu, services=gpu.services[:1])),
            "shared": one(replace(gpu, share_weights=True, batching="isolated")),
            "fused": one(replace(gpu, share_weights=True, batching="fused")),
            "unshared": one(replace(gpu, share_weights=False))}


# ---- colocate deployments ---------------------------------------------------------------

class ColocateServers:
    """One scenario's deployment, started on enter and shut down on exit."""

    def __init__(self, config: DeploymentConfig, torch_threads: int, timeout_s: float,
                 door: str = "grpc") -> None:
        """door: "grpc" (Client.generate) or "http" (the services' OpenAI-compatible
        /v1/completions, as the peers are driven; a free http_port where none is set)."""
        if door == "http":
            config = with_http_ports(config)
        self.config, self.gpu = config, config.gpus[0]
        self.deployment = Deployment(config, torch_threads=torch_threads)
        try:
            endpoints = self.deployment.wait_ready(timeout=timeout_s)
        except BaseException:
            self.deployment.shutdown()
            raise
        token = {s.name: s.tenants[0].token for s in self.gpu.services}
        by_name = {e.service: e for e in endpoints}
        if door == "http":
            # The same body and reading as the peers get, plus the tenant's token; the
            # final usage chunk gives the exact token count.
            extra = {"ignore_eos": True, "stream_options": {"include_usage": True}}
            self.targets: list[Target] = [
                OpenAITarget(s.name, by_name[s.name].http_url.removesuffix("/v1"),
                             s.model_names[0], extra, token=token[s.name])
                for s in self.gpu.services]
        else:
            self.targets = [ColocateTarget(s.name, by_name[s.name].target, token[s.name])
                            for s in self.gpu.services]
        # status() lists the services' pids; the supervisor's own is asked of it.
        supervisor = self.deployment.supervisor(self.gpu.device)
        import ray
        self.supervisor_pid = ray.get(supervisor.__ray_call__.remote(lambda _: os.getpid()))

    def pids(self) -> dict[str, int]:
        """The serving processes: every service and the supervisor."""
        (device,) = self.deployment.status()
        pids = {f"service {s['name']}": s["stats"].pid for s in device["services"]
                if s["stats"] is not None}
        return {**pids, "supervisor": self.supervisor_pid}

    def memory(self) -> dict:
        """Bytes measured now: PSS per process on CPU (shared pages split among the
        processes mapping them, so one copy of the weights counts once), NVML on CUDA."""
        (device,) = self.deployment.status(with_stats=False)
        return measure(self.gpu.device, self.pids(), extra={
            "weight_copies": device["weight_copies"],
            "weight_store_bytes": device["weight_store_bytes"],
            "reserved_bytes": device["reserved_bytes"]})

    def close(self) -> None:
        for t in self.targets:
            t.close()
        self.deployment.shutdown()

    def __enter__(self) -> "ColocateServers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure(device: str, pids: dict[str, int], extra: dict | None = None) -> dict:
    """Memory per process, each counted once: the services of a fused group share
    one process, listed under their names joined."""
    by_pid = device_process_memory(device, list(set(pids.values())))
    labels: dict[int, list[str]] = {}
    for label, pid in pids.items():
        labels.setdefault(pid, []).append(label)
    per = {"+".join(names): by_pid.get(pid, 0) for pid, names in labels.items()}
    return {"kind": "cuda (NVML)" if device.startswith("cuda") else "PSS",
            "total_bytes": sum(per.values()), "per_process": per, **(extra or {})}


def cpu_seconds(pids: dict[str, int]) -> float:
    """User + system CPU seconds the processes have used so far (their threads too)."""
    total = 0.0
    for pid in set(pids.values()):      # a fused group's services share one process
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:         # gone: its share is simply missing
            pass
    return total


def describe(config: DeploymentConfig) -> dict:
    """The deployment as the JSON records it (no tokens)."""
    gpu = config.gpus[0]
    return {"device": gpu.device, "share_weights": gpu.share_weights,
            "models": {k: {"path": m.path, "dtype": m.dtype, "quantization": m.quantization}
                       for k, m in config.models.items()},
            "services": [{"name": s.name, "model": s.model, "max_model_len": s.max_model_len,
                          "kv_cache": {"dtype": s.kv_cache.dtype, "tokens": s.kv_cache.tokens,
                                       "budget_bytes": s.kv_cache.budget_bytes},
                          "max_num_seqs": s.max_num_seqs,
                          "max_num_batched_tokens": s.max_num_batched_tokens}
                         for s in gpu.services]}
