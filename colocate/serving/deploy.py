"""From a deployment YAML to running services: Ray, one GPUSupervisor per device entry.

Deployment is the driver's side: it reads the YAML (tokens from the driver's own
environment, since Ray workers may not share it), starts Ray locally or joins a
cluster, places one supervisor per `gpus[]` entry, and waits until every service
answers. `colocate serve` (run_serve) wraps it with printing and signal handling.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TextIO

import ray
from ray.exceptions import RayActorError, RayTaskError

from colocate.config import DeploymentConfig, DeviceSpec, load_config
from colocate.serving.supervisor import (SHUTDOWN_GRACE_S, STARTUP_TIMEOUT_S, DeploymentError,
                                         GPUSupervisor)

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "cpu-3x-small.yaml"
OBJECT_STORE_BYTES = 512 * 2**20     # only small control messages travel through Ray

# The built-in default, used when the repository's deploy/examples/ is not there (an
# installed wheel has no deploy/ folder). Kept equal to that file by a test.
EMBEDDED_DEFAULT_CONFIG = """\
models:
  small: {path: "preset:small", dtype: float32}
gpus:
  - device: cpu
    share_weights: true
    metrics_port: 9400
    services:
""" + "".join(f"""\
      - name: small-{x}
        model: small
        port: {port}
        max_model_len: 1024
        kv_cache: {{dtype: {kv}, tokens: 8192}}
        max_num_seqs: 16
        max_num_batched_tokens: 512
        tenants: [{{name: tenant-{x}, token_env: TENANT_{x.upper()}_TOKEN}}]
""" for x, port, kv in (("a", 50051, "auto"), ("b", 50052, "auto"), ("c", 50053, "int8")))


def default_config_path() -> Path:
    """deploy/examples/cpu-3x-small.yaml beside the package (an editable install),
    else the embedded copy written to a temporary file."""
    repo_copy = Path(__file__).resolve().parents[2] / "deploy" / "examples" / DEFAULT_CONFIG_NAME
    if repo_copy.is_file():
        return repo_copy
    fd, name = tempfile.mkstemp(prefix="colocate-default-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(EMBEDDED_DEFAULT_CONFIG)
    return Path(name)


def load_with_demo_tokens(path: Path, env: Mapping[str, str] | None = None
                          ) -> tuple[DeploymentConfig, dict[str, str]]:
    """Load `path`; every tenant token variable that is unset gets a random token.

    Only for the built-in local demo: a real deployment must name its secrets. Returns
    the config and the generated tokens (variable -> token), for printing."""
    env = dict(os.environ if env is None else env)
    unset = {t.token_env for _, s in load_config(path, env, check_env=False).services()
             for t in s.tenants if t.token is None}
    generated = {var: secrets.token_urlsafe(18) for var in sorted(unset)}
    return load_config(path, {**env, **generated}), generated


def tenant_tokens(gpu: DeviceSpec) -> dict[str, dict[str, str]]:
    """service name -> {bearer token: tenant name}, as the services authenticate."""
    return {s.name: {t.token: t.name for t in s.tenants} for s in gpu.services}


@dataclass(frozen=True)
class Endpoint:
    service: str
    device: str
    target: str                   # host:port a client dials
    token_envs: tuple[str, ...]   # the variables holding its tenants' tokens
    state: str
    restarts: int


class Deployment:
    """A running deployment; use as a context manager, or call shutdown()."""

    def __init__(self, config: DeploymentConfig, *, address: str | None = None,
                 host: str = "127.0.0.1", torch_threads: int | None = None,
                 health_interval_s: float = 2.0, preset_dir: str | None = None,
                 metrics_host: str | None = None, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
                 **supervisor_options) -> None:
        """host: where the services' gRPC servers listen; metrics_host: where each
        device's /metrics listens (default: host). shutdown_grace_s: how long requests
        in flight may run on once shutdown() begins. supervisor_options: the rest of
        Supervisor's keywords (health_timeout_s, failed_checks_before_restart,
        ledger_dir, test_hooks)."""
        self.config = config
        self.shutdown_grace_s = shutdown_grace_s
        self._owns_ray = init_ray(address)
        self.supervisors: dict[str, object] = {}
        try:
            for gpu in config.gpus:
                # CPU entries reserve nothing; a CUDA entry takes one whole GPU, which
                # its services then share without reserving more.
                actor = GPUSupervisor.options(num_gpus=1 if gpu.is_cuda else 0).remote(
                    gpu, config, tenants=tenant_tokens(gpu), host=host,
                    torch_threads=torch_threads, health_interval_s=health_interval_s,
                    preset_dir=preset_dir, metrics_host=metrics_host, **supervisor_options)
                self.supervisors[gpu.device] = actor
            _unwrap(lambda: ray.get([s.start.remote() for s in self.supervisors.values()]))
        except BaseException:
            self.shutdown()
            raise

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> list[Endpoint]:
        _unwrap(lambda: ray.get([s.wait_ready.remote(timeout)
                                 for s in self.supervisors.values()]))
        return self.endpoints()

    def status(self, with_stats: bool = True) -> list[dict]:
        return ray.get([s.status.remote(with_stats) for s in self.supervisors.values()])

    def endpoints(self) -> list[Endpoint]:
        envs = {s.name: tuple(t.token_env for t in s.tenants)
                for _, s in self.config.services()}
        out = []
        for dev in self.status(with_stats=False):
            for s in dev["services"]:
                # A server bound to every interface is reached at its node's address.
                host = dev["node_ip"] if s["host"] in ("0.0.0.0", "::") else s["host"]
                out.append(Endpoint(s["name"], dev["device"], f"{host}:{s['port']}",
                                    envs[s["name"]], s["state"], s["restarts"]))
        return out

    def metrics_urls(self) -> dict[str, str]:
        """device -> the URL Prometheus scrapes for it and all its services."""
        out = {}
        for dev in self.status(with_stats=False):
            url = dev["metrics_url"]
            for wildcard in ("0.0.0.0", "[::]"):   # reached at the node's address
                url = url.replace(f"//{wildcard}:", f"//{dev['node_ip']}:")
            out[dev["device"]] = url
        return out

    def supervisor(self, device: str):
        return self.supervisors[device]

    def shutdown(self) -> None:
        """Stop every service and supervisor, letting requests in flight finish first
        (up to shutdown_grace_s); stop Ray if this deployment started it."""
        supervisors, self.supervisors = list(self.supervisors.values()), {}
        grace = self.shutdown_grace_s
        try:
            ray.get([s.shutdown.remote(grace) for s in supervisors], timeout=grace + 60)
        except Exception as exc:        # a supervisor already gone: its services went too
            log.warning("shutdown: %s", exc)
        for s in supervisors:
            ray.kill(s, no_restart=True)
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def init_ray(address: str | None) -> bool:
    """Join `address`, or start a small local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Requests go over gRPC, not through Ray, so its object store only carries
        # small control messages; the dashboard would cost a core's worth at startup.
        ray.init(object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=True)
    return True


def _unwrap(call):
    """Run a ray.get, turning a supervisor's DeploymentError back into a plain one
    (its message, without the remote traceback Ray wraps it in)."""
    try:
        return call()
    except RayTaskError as exc:
        if isinstance(exc.cause, DeploymentError):
            raise DeploymentError(str(exc.cause)) from None
        raise
    except RayActorError as exc:
        raise DeploymentError(f"a supervisor died: {exc}") from None


# ---- colocate serve ------------------------------------------------------------------

def run_serve(config: str | None, address: str | None = None, *, host: str = "127.0.0.1",
              torch_threads: int | None = None, demo: bool = False,
              out: TextIO = sys.stdout, grace: float = SHUTDOWN_GRACE_S) -> int:
    """Start the deployment, print how to reach it, block until Ctrl-C or SIGTERM;
    then stop gracefully: requests in flight get `grace` seconds to finish."""
    generated: dict[str, str] = {}
    try:
        if config is None:
            path = default_config_path()
            print(f"no config given: using the built-in CPU default ({path})", file=out)
            cfg, generated = load_with_demo_tokens(path)
        else:
            cfg = load_config(config)
    except ValueError as exc:           # ConfigError included
        print(f"colocate serve: {exc}", file=sys.stderr)
        return 2
    print(f"starting {sum(1 for _ in cfg.services())} service(s) on "
          f"{', '.join(g.device for g in cfg.gpus)} ...", file=out, flush=True)
    try:
        deployment = Deployment(cfg, address=address, host=host, torch_threads=torch_threads,
                                shutdown_grace_s=grace)
    except DeploymentError as exc:
        print(f"colocate serve: {exc}", file=sys.stderr)
        return 1
    stop = _stop_on_signals()     # after ray.init, which installs a SIGTERM handler of its own
    with deployment:
        try:
            endpoints = deployment.wait_ready()
        except DeploymentError as exc:
            print(f"colocate serve: {exc}", file=sys.stderr)
            return 1
        print_endpoints(endpoints, generated, out, deployment.metrics_urls())
        if demo:
            send_demo_requests(cfg, endpoints, out)
        print("serving; Ctrl-C to stop", file=out, flush=True)
        try:
            while not stop.wait(1.0):     # a timed wait keeps Ctrl-C prompt
                pass
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", file=out, flush=True)
    print("stopped", file=out)
    return 0


def _stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set. Explicit for SIGINT too: a shell starts
    background jobs with SIGINT ignored, and Python would leave it so."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop


def print_endpoints(endpoints: list[Endpoint], generated: Mapping[str, str],
                    out: TextIO, metrics_urls: Mapping[str, str] | None = None) -> None:
    width = max(len(e.service) for e in endpoints)
    print("\nready:", file=out)
    for e in endpoints:
        print(f"  {e.service:<{width}}  {e.target}  ({e.device}; tokens in "
              f"{', '.join('$' + v for v in e.token_envs)})", file=out)
    if metrics_urls:
        print("\nmetrics (one Prometheus target per device):", file=out)
        for device, url in metrics_urls.items():
            print(f"  {device}  {url}", file=out)
    if generated:
        # Printing a secret is acceptable only here: a local demo whose tokens were
        # made up for this run, and die with it.
        print("\nlocal demo: these tenant tokens were generated for this run only:", file=out)
        for var, token in generated.items():
            print(f"  export {var}={token}", file=out)
    first = endpoints[0]
    print(f"\ntry:\n  colocate generate --target {first.target} "
          f"--token \"${first.token_envs[0]}\" \"Hello\"\n", file=out, flush=True)


def send_demo_requests(cfg: DeploymentConfig, endpoints: list[Endpoint],
                       out: TextIO, max_tokens: int = 24) -> None:
    """One short request to every service, with its first tenant's token."""
    from colocate.client import Client

    token_of = {s.name: s.tenants[0].token for _, s in cfg.services()}
    for e in endpoints:
        with Client(e.target, token_of[e.service], timeout=120) as client:
            text = client.generate_text("Hello", max_tokens=max_tokens, temperature=0.0)
        print(f"  {e.service}: 'Hello' -> {text!r}", file=out, flush=True)
    print(file=out)
