"""From a deployment YAML to running services: Ray, one GPUSupervisor per device entry.

Deployment is the driver's side: it reads the YAML (tokens from the driver's own
environment, since Ray workers may not share it), starts Ray locally or joins a
cluster, places one supervisor per `gpus[]` entry on a node with room for it (all
of them or none; fleet.py, placement.py), and waits until every service answers.
A service listed under several entries runs once per entry; targets() gives each
service the one address list its tenants dial. `colocate serve` (run_serve) wraps
it with printing and signal handling.
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
from ray.exceptions import GetTimeoutError, RayActorError

from colocate import progress
from colocate.config import DeploymentConfig, DeviceSpec, load_config
from colocate.cluster.apply import apply_to, tenant_tokens, unwrap
from colocate.cluster.progress_relay import ProgressRelay
from colocate.cluster.fleet import Fleet, Placed
from colocate.cluster.serve_report import print_endpoints
from colocate.cluster.placement import (CPU_DEVICE_RESOURCE, LOCAL_CPU_DEVICE_SLOTS,
                                        PLACEMENT_TIMEOUT_S, PlacementError)  # noqa: F401
from colocate.cluster.supervisor import (SHUTDOWN_GRACE_S, STARTUP_TIMEOUT_S, DeploymentError,
                                         GPUSupervisor)

log = logging.getLogger(__name__)

DEFAULT_CONFIG_NAME = "cpu-3x-smollm2.yaml"
OBJECT_STORE_BYTES = 512 * 2**20     # only small control messages travel through Ray
STATUS_TIMEOUT_S = 30.0

# The built-in default, used when the repository's deploy/examples/ is not there (an
# installed wheel has no deploy/ folder). Kept equal to that file by a test.
EMBEDDED_DEFAULT_CONFIG = """\
models:
  smollm2: {path: "preset:smollm2-135m-instruct", dtype: float32}
gpus:
  - device: cpu
    share_weights: true
    metrics_port: 9400
    services:
""" + "".join(f"""\
      - name: chat-{x}
        model: smollm2
        port: {port}
        http_port: {http_port}
        max_model_len: 2048
        kv_cache: {{dtype: {kv}, tokens: 4096}}
        max_num_seqs: 16
        max_num_batched_tokens: 512
        tenants: [{{name: tenant-{x}, token_env: TENANT_{x.upper()}_TOKEN}}]
""" for x, port, http_port, kv in (("a", 50051, 8001, "auto"), ("b", 50052, 8002, "auto"),
                                   ("c", 50053, 8003, "int8")))

def default_config_path() -> Path:
    """deploy/examples/cpu-3x-smollm2.yaml beside the package (an editable install),
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


@dataclass(frozen=True)
class Endpoint:
    service: str
    device: str
    target: str                   # host:port a client dials
    token_envs: tuple[str, ...]   # the variables holding its tenants' tokens
    state: str
    restarts: int
    entry: str = ""               # the device entry (one per replica of a service)
    http_url: str = ""            # the OpenAI-compatible API's base URL, if it has one


class Deployment:
    """A running deployment; use as a context manager, or call shutdown()."""

    def __init__(self, config: DeploymentConfig, *, address: str | None = None,
                 host: str = "127.0.0.1", torch_threads: int | None = None,
                 health_interval_s: float = 2.0, preset_dir: str | None = None,
                 metrics_host: str | None = None, shutdown_grace_s: float = SHUTDOWN_GRACE_S,
                 name: str | None = None, placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
                 progress_to: progress.Reporter | None = None, **supervisor_options) -> None:
        """host: where the services' gRPC servers listen; metrics_host: where each
        device's /metrics listens (default: host). shutdown_grace_s: how long requests
        in flight may run on once shutdown() begins. name: the deployment's name on
        the cluster (default: the YAML's `name`, else its file name and a random
        suffix). progress_to: where the supervisors' loading and starting stages show
        (default: progress.current(): bars on a terminal). supervisor_options: the
        rest of Supervisor's keywords (health_timeout_s, failed_checks_before_restart,
        ledger_dir, test_hooks).

        Raises DeploymentError (PlacementError when an entry has no node) before any
        service starts if the deployment cannot be placed whole."""
        self.config = config
        self.host = host
        self.shutdown_grace_s = shutdown_grace_s
        self.health_interval_s = health_interval_s
        self.name = name or config.name or f"{Path(config.source).stem}-{secrets.token_hex(3)}"
        self._owns_ray = init_ray(address)

        def make_supervisor(gpu: DeviceSpec, options: dict, replacement: int = 0):
            # Supervisors take no CPU (see supervisor.py); options hold the bundle,
            # the name, and the GPU or custom resource the entry took.
            return GPUSupervisor.options(**options).remote(
                gpu, config, tenants=tenant_tokens(gpu), host=host,
                torch_threads=torch_threads, health_interval_s=health_interval_s,
                preset_dir=preset_dir, metrics_host=metrics_host, replacement=replacement,
                **supervisor_options)

        self.fleet = Fleet(config, self.name, make_supervisor, host=host,
                           placement_timeout_s=placement_timeout_s)
        try:
            self.fleet.place()
            # One relay for the start and the wait, so no stage is shown twice.
            self._relay = ProgressRelay(self.supervisors, progress_to or progress.current())
            unwrap(lambda: self._relay.get([s.start.remote()
                                             for s in self.supervisors.values()]))
        except BaseException:
            self.shutdown()
            raise

    @property
    def supervisors(self) -> dict[str, object]:
        """entry name (the device, unless named or pinned) -> its running supervisor."""
        return self.fleet.actors()

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> list[Endpoint]:
        unwrap(lambda: self._relay.get([s.wait_ready.remote(timeout)
                                         for s in self.supervisors.values()]))
        # From here on, a lost node is noticed (and, if allowed, its entries re-placed).
        self.fleet.watch(self.health_interval_s, timeout)
        return self.endpoints()

    def status(self, with_stats: bool = True) -> list[dict]:
        """One row per device entry, in YAML order: a running supervisor's status(),
        or, for an entry whose node is gone, a row whose services are all `lost`."""
        refs = {name: actor.status.remote(with_stats)
                for name, actor in self.supervisors.items()}
        rows = []
        for placed in self.fleet.placed():
            row = None
            if placed.entry in refs:
                try:
                    row = ray.get(refs[placed.entry], timeout=STATUS_TIMEOUT_S)
                except (RayActorError, GetTimeoutError) as exc:   # its node just went
                    placed.error = placed.error or f"supervisor unreachable: {exc}"
            rows.append(row or lost_row(placed, self.host))
        return rows

    def endpoints(self) -> list[Endpoint]:
        # A service a `colocate apply` from another process added is not in this
        # driver's config: it is listed without its token variables.
        envs = {s.name: tuple(t.token_env for t in s.tenants)
                for _, s in self.config.services()}
        http = {s.name: (s.http_port, s.tls is not None) for _, s in self.config.services()}
        out = []
        for dev in self.status(with_stats=False):
            for s in dev["services"]:
                # A server bound to every interface is reached at its node's address.
                host = dev["node_ip"] if s["host"] in ("0.0.0.0", "::") else s["host"]
                http_port, tls = http.get(s["name"], (None, False))
                url = (f"{'https' if tls else 'http'}://{host}:{http_port}/v1"
                       if http_port is not None else "")
                out.append(Endpoint(s["name"], dev["device"], f"{host}:{s['port']}",
                                    envs.get(s["name"], ()), s["state"], s["restarts"],
                                    dev["entry"], url))
        return out

    def targets(self) -> dict[str, str]:
        """service -> the one gRPC target its tenants dial: host:port, or for a
        replicated service every replica's address, balanced by the client."""
        by_service: dict[str, list[str]] = {}
        for e in self.endpoints():
            by_service.setdefault(e.service, []).append(e.target)
        return {name: replica_target(addresses) for name, addresses in by_service.items()}

    def metrics_urls(self) -> dict[str, str]:
        """entry (the device, unless named or pinned) -> the URL Prometheus scrapes
        for it and all its services."""
        out = {}
        for dev in self.status(with_stats=False):
            url = dev["metrics_url"]
            if url is None:          # lost with its node
                continue
            for wildcard in ("0.0.0.0", "[::]"):   # reached at the node's address
                url = url.replace(f"//{wildcard}:", f"//{dev['node_ip']}:")
            out[dev["entry"]] = url
        return out

    def supervisor(self, entry: str):
        return self.supervisors[entry]

    def apply(self, config: DeploymentConfig) -> list[str]:
        """Change the running deployment to `config` live (apply.py): every entry or
        none; only the services that differ are started, stopped or restarted. One
        summary line per entry; DeploymentError, with nothing changed, if refused."""
        lines = apply_to(self.supervisors, config, self.shutdown_grace_s)
        self.config = config
        return lines

    def shutdown(self) -> None:
        """Stop every service and supervisor, letting requests in flight finish first
        (up to shutdown_grace_s); stop Ray if this deployment started it."""
        self.fleet.stop_watch()
        supervisors = list(self.supervisors.values())
        grace = self.shutdown_grace_s
        try:
            ray.get([s.shutdown.remote(grace) for s in supervisors], timeout=grace + 60)
        except Exception as exc:        # a supervisor already gone: its services went too
            log.warning("shutdown: %s", exc)
        self.fleet.release()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def lost_row(placed: Placed, host: str) -> dict:
    """A status row for an entry with no supervisor to ask: its services, all lost."""
    services = [dict(name=s.name, state="lost", restarts=0, error=placed.error, port=s.port,
                     host=host, kv_tokens=None, last_restart_s=None, stats=None)
                for s in placed.slot.gpu.services]
    return dict(entry=placed.entry, device=placed.slot.gpu.device,
                node_id=placed.slot.node.node_id, node_ip=placed.slot.node.ip,
                state=placed.state, services=services, ledger=[], reserved_bytes=0,
                capacity_bytes=None, weight_store_bytes=0, weight_copies=0, metrics_url=None)


def replica_target(addresses: list[str]) -> str:
    """One address as is; several as a gRPC `ipv4:`/`ipv6:` list when every host is
    an IP literal (what any gRPC client accepts), else comma-joined (colocate's
    Client resolves those)."""
    if len(addresses) == 1:
        return addresses[0]
    from colocate.service.targets import address_list_target
    return address_list_target(addresses)


def init_ray(address: str | None) -> bool:
    """Join `address` (`auto`: the cluster this host belongs to), or start a small
    local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local": a new Ray even if this host runs a cluster (`--address auto` joins
        # that). Requests go over gRPC, not through Ray, so its object store only
        # carries small control messages; the dashboard would cost a core's worth at
        # startup. The custom resource lets CPU entries be placed like on a cluster.
        ray.init(address="local", object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True,
                 resources={CPU_DEVICE_RESOURCE: LOCAL_CPU_DEVICE_SLOTS})
    return True


# ---- colocate serve ------------------------------------------------------------------

def run_serve(config: str | None, address: str | None = None, *, host: str = "127.0.0.1",
              torch_threads: int | None = None, on_ready=None,
              out: TextIO = sys.stdout, grace: float = SHUTDOWN_GRACE_S,
              quiet: bool = False) -> int:
    """Start the deployment, print how to reach it, block until Ctrl-C or SIGTERM;
    then stop gracefully: requests in flight get `grace` seconds to finish.
    on_ready(config, endpoints, out), if given, runs once every service answers (the
    CLI's --demo passes colocate.serve_demo.send_demo_requests: a tenant's calls,
    which live above this layer). Loading and starting show as progress bars on a
    terminal, one line per stage elsewhere, nothing with `quiet`."""
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
          f"{', '.join(g.entry_name for g in cfg.gpus)} ...", file=out, flush=True)
    try:
        deployment = Deployment(cfg, address=address, host=host, torch_threads=torch_threads,
                                shutdown_grace_s=grace,
                                progress_to=progress.auto(out, quiet=quiet))
    except DeploymentError as exc:
        print(f"colocate serve: {exc}", file=sys.stderr)
        return 1
    stop = _stop_on_signals()     # after ray.init, which installs a SIGTERM handler of its own
    reload = _event_on(signal.SIGHUP)
    with deployment:
        try:
            endpoints = deployment.wait_ready()
        except DeploymentError as exc:
            print(f"colocate serve: {exc}", file=sys.stderr)
            return 1
        print_endpoints(endpoints, generated, out, deployment.metrics_urls(),
                        deployment.targets())
        if on_ready is not None:
            on_ready(cfg, endpoints, out)
        print("serving; Ctrl-C to stop", file=out, flush=True)
        try:
            while not stop.wait(1.0):     # a timed wait keeps Ctrl-C prompt
                if reload.is_set():
                    reload.clear()
                    _reload(deployment, config, out)
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", file=out, flush=True)
    print("stopped", file=out)
    return 0


def _event_on(sig: int) -> threading.Event:
    event = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(sig, lambda *_: event.set())
    return event


def _reload(deployment: Deployment, path: str | None, out: TextIO) -> None:
    """SIGHUP: apply the YAML file again, live (Deployment.apply)."""
    if path is None:
        print("SIGHUP: the built-in default has no file to reload", file=out, flush=True)
        return
    try:
        lines = deployment.apply(load_config(path))
    except (ValueError, DeploymentError) as exc:      # ConfigError is a ValueError
        print(f"reload of {path} refused, nothing changed: {exc}", file=out, flush=True)
        return
    for line in lines:
        print(f"reloaded {path}: {line}", file=out, flush=True)


def _stop_on_signals() -> threading.Event:
    """An event that SIGTERM and SIGINT set. Explicit for SIGINT too: a shell starts
    background jobs with SIGINT ignored, and Python would leave it so."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    return stop
