"""The peer scenario of bench/colocation.py: other servers, on the same model, behind an
OpenAI-compatible streaming API, one per service, driven by the same client
(colocation_load.OpenAITarget) as colocate's HTTP door.

  transformers  `transformers serve --continuous-batching` on the checkpoint, on CPU;
  llamacpp      `python -m llama_cpp.server` (llama-cpp-python) on the same GGUF file;
  --peer-url    servers someone else started (vLLM, SGLang, TGI on a GPU).
The started ones get the benchmark's torch thread count and a KV cache of as many
tokens as the service's, and their processes are measured like colocate's.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from colocate.config import DeploymentConfig
from colocate.cluster.supervisor import checkpoint_dir
from colocation_load import OpenAITarget, Target
from colocation_servers import free_port, measure

PEERS = ("transformers", "llamacpp")
SERVE_MODULES = ("fastapi", "uvicorn", "openai")   # what `transformers serve` imports
# what `python -m llama_cpp.server` imports (pip install 'llama-cpp-python[server]')
LLAMACPP_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                    "pydantic_settings")
PEER_BLOCK = 16                                    # tokens per KV block, as colocate's


def kv_tokens(config: DeploymentConfig, service) -> int:
    """The tokens a service's KV budget holds, for sizing a peer's cache alike."""
    from colocate.memory.sizing import ModelFootprint, kv_budget
    return kv_budget(ModelFootprint.of(config.models[service.model]), service)[1]


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def peer_unavailable(peer: str, device: str, checkpoint: str | Path) -> str | None:
    """Why peers of kind `peer` cannot be started here, or None if they can."""
    if not device.startswith("cpu"):
        return "peers are started only on CPU; on a GPU pass --peer-url (vLLM, SGLang, TGI)"
    if peer == "llamacpp":
        if not str(checkpoint).endswith(".gguf"):
            return f"llama.cpp serves a GGUF file; the model is {checkpoint}"
        missing = _missing(LLAMACPP_MODULES)
        return (f"`llama_cpp.server` needs {', '.join(missing)}: "
                f"pip install 'llama-cpp-python[server]'") if missing else None
    if shutil.which("transformers", path=str(Path(sys.executable).parent)) is None:
        return "no `transformers` command beside this Python (pip install transformers)"
    missing = _missing(SERVE_MODULES)
    return (f"`transformers serve` needs {', '.join(missing)}: "
            f"pip install 'transformers[serving]'") if missing else None


def transformers_command(checkpoint: str, port: int, dtype: str, kv: int) -> list[str]:
    """Continuous batching on (its closest to a serving engine; without it requests are
    generated one at a time) and a paged KV cache of `kv` tokens (left to itself it sizes
    the cache by a share of the machine's RAM: gigabytes here)."""
    return [str(Path(sys.executable).parent / "transformers"), "serve", checkpoint,
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", dtype,
            "--continuous-batching", "--cb-block-size", str(PEER_BLOCK),
            "--cb-num-blocks", str(-(-kv // PEER_BLOCK))]


def llamacpp_command(gguf: str, port: int, threads: int, n_ctx: int) -> list[str]:
    """One llama.cpp context of n_ctx tokens; the same threads for prompt and decode.
    The server answers one request at a time (a lock around its one model)."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
            str(threads), "--n_ctx", str(n_ctx), "--n_batch", "512", "--verbose", "False"]


# How each server is told to ignore EOS, as the colocate services are: min = max tokens.
# `transformers serve` takes a generation config; llama.cpp a min_tokens field.
IGNORE_EOS = {
    "transformers": {"generation_config": '{"do_sample": false, "min_new_tokens": {max_tokens}}'},
    "llamacpp": {"min_tokens": "{max_tokens}"},
}
HEALTH_PATH = {"transformers": "/health", "llamacpp": "/v1/models"}


def peer_commands(peer: str, config: DeploymentConfig, threads: int,
                  ports: list[int]) -> list[list[str]]:
    """The command of each service's peer server, on the given ports."""
    gpu = config.gpus[0]
    model = config.models[gpu.services[0].model]
    checkpoint = str(checkpoint_dir(model))
    if peer == "llamacpp":
        return [llamacpp_command(checkpoint, port, threads, kv_tokens(config, s))
                for s, port in zip(gpu.services, ports)]
    dtype = model.dtype if model.dtype != "auto" else "auto"
    return [transformers_command(checkpoint, port, dtype, kv_tokens(config, s))
            for s, port in zip(gpu.services, ports)]


class ProcessPeers:
    """One peer server process per service, started here, each with its log."""

    def __init__(self, peer: str, config: DeploymentConfig, torch_threads: int,
                 timeout_s: float, log_dir: Path) -> None:
        services = config.gpus[0].services
        self.checkpoint = str(checkpoint_dir(config.models[services[0].model]))
        env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        ports = [free_port() for _ in services]
        commands = peer_commands(peer, config, torch_threads, ports)
        self.command = " ".join(commands[-1])
        self.procs: list[subprocess.Popen] = []
        self.targets: list[Target] = []
        log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for s, port, cmd in zip(services, ports, commands):
                log = open(log_dir / f"peer-{peer}-{s.name}.log", "w")
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
                self.targets.append(OpenAITarget(s.name, f"http://127.0.0.1:{port}",
                                                 self.checkpoint, IGNORE_EOS[peer]))
            for proc, port in zip(self.procs, ports):
                wait_healthy(f"http://127.0.0.1:{port}", proc, timeout_s, HEALTH_PATH[peer])
        except BaseException:
            self.close()
            raise

    def pids(self) -> dict[str, int]:
        pids = {}
        for proc, t in zip(self.procs, self.targets):     # a server and any children
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(True)]
            pids.update({f"peer {t.name}" + (f" child {i}" if i else ""): pid
                         for i, pid in enumerate(tree)})
        return pids

    def memory(self) -> dict:
        return measure("cpu", self.pids())

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> "ProcessPeers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class UrlPeers:
    """Servers someone else started (vLLM, SGLang, TGI on a GPU). One URL serves every
    tenant's load, or one URL per tenant. `ignore_eos` is vLLM's and SGLang's name
    for what the colocate services are asked to do; their memory is not ours to see."""

    def __init__(self, urls: list[str], names: list[str], model: str) -> None:
        if len(urls) not in (1, len(names)):
            raise ValueError(f"--peer-url: give 1 URL or {len(names)}, got {len(urls)}")
        urls = urls * len(names) if len(urls) == 1 else urls
        self.command = "given by --peer-url"
        self.targets: list[Target] = [OpenAITarget(n, u, model, {"ignore_eos": True})
                                      for n, u in zip(names, urls)]

    def pids(self) -> dict[str, int]:
        return {}

    def memory(self) -> dict | None:
        return None

    def __enter__(self) -> "UrlPeers":
        return self

    def __exit__(self, *exc) -> None:
        pass


def wait_healthy(base_url: str, proc: subprocess.Popen | None, timeout_s: float,
                 path: str = "/health") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{base_url}: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(base_url + path, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}: not healthy after {timeout_s:.0f} s")
        time.sleep(0.5)
