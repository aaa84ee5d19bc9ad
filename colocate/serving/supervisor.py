"""GPUSupervisor: one device's weights, its ledger, and the services running on it.

One supervisor per `gpus[]` entry. It books every service with the MemoryArbiter
before anything is loaded (a refusal names the service and the shortfall), publishes
each model once in the WeightStore (once per service with share_weights: false, so
unshared really means separate copies), starts one ServiceActor per service with its
weight handle and KV budget, and then health-checks them from a background thread.

A service that dies (or whose engine loop stopped, or that stops answering pings) is
restarted alone: its budget goes back to the ledger first and is booked again, so the
ledger reads the same before and after, and the other services never notice.

It also serves the device's one /metrics endpoint (on the YAML's `metrics_port`, a
free port if none): each scrape asks the running services for their statistics over
Ray and adds the ledger, the weight store and the memory measured per process.

Ray owns the service actors through this actor: if the supervisor dies, Ray kills its
services too, and the weight store's files are swept by the next store on the host.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util import get_node_ip_address
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from colocate.config import DeploymentConfig, DeviceSpec, ModelSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.weight_store import WeightStore
from colocate.metrics.device import device_sample
from colocate.metrics.endpoint import MetricsEndpoint
from colocate.metrics.samples import DeviceSample
from colocate.serving.service import ServiceActor, ServiceLaunch

log = logging.getLogger(__name__)

PRESET_SEED = 0                 # `preset:NAME` always means this seed's checkpoint
STARTUP_TIMEOUT_S = 300.0       # a 13B model maps fast, but CUDA init and warm-up do not
PING_TIMEOUT_S = 10.0
SCRAPE_TIMEOUT_S = 2.0          # a slow service drops out of one scrape, not all of it
MISSED_PINGS_BEFORE_RESTART = 3


class DeploymentError(RuntimeError):
    """A deployment that cannot start, with a message meant for the operator.

    A plain one-string exception on purpose: it crosses Ray intact, so the driver can
    print the message instead of a remote traceback."""


# ---- things a supervisor decides on its own -----------------------------------------

def preset_cache_dir() -> Path:
    """Where `preset:NAME` checkpoints are written: $COLOCATE_CACHE, else
    $XDG_CACHE_HOME/colocate, else ~/.cache/colocate; one folder per preset under
    presets/. Per user rather than per deployment so a restart does not rewrite them."""
    root = os.environ.get("COLOCATE_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "colocate"
    return Path(root) / "presets"


def preset_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of preset `name`, written on first use.

    Written under a temporary name and renamed into place, so a directory that exists
    is complete, and two supervisors writing at once simply leave one of the copies.
    """
    from colocate.model.tiny import write_tiny_checkpoint

    final = (cache_dir or preset_cache_dir()) / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    write_tiny_checkpoint(scratch, preset=name, seed=PRESET_SEED)
    try:
        scratch.rename(final)
    except OSError:                  # another process got there first: keep theirs
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def checkpoint_dir(model: ModelSpec, cache_dir: Path | None = None) -> Path:
    return preset_checkpoint(model.preset, cache_dir) if model.preset else Path(model.path)


def default_torch_threads(num_services: int, cores: int | None = None) -> int:
    """An equal share of the cores per service, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, num_services))


# ---- the supervisor ------------------------------------------------------------------

@dataclass
class _Slot:
    """One service as the supervisor tracks it."""
    launch: ServiceLaunch
    actor: object | None = None
    state: str = "starting"          # starting | running | restarting | failed | stopped
    restarts: int = 0
    missed_pings: int = 0
    error: str = ""

    @property
    def name(self) -> str:
        return self.launch.spec.name


class Supervisor:
    """The supervisor's logic; GPUSupervisor below is this class as a Ray actor."""

    def __init__(self, gpu: DeviceSpec, config: DeploymentConfig, *,
                 tenants: dict[str, dict[str, str]], host: str = "127.0.0.1",
                 torch_threads: int | None = None, health_interval_s: float = 2.0,
                 preset_dir: str | None = None, metrics_host: str | None = None) -> None:
        """tenants: service name -> {token: tenant name}, resolved by the driver.
        metrics_host: where /metrics listens; default `host`."""
        self.gpu = gpu
        self.config = config
        self.host = host
        self.metrics_host = metrics_host or host
        self.metrics: MetricsEndpoint | None = None
        self.health_interval_s = health_interval_s
        self.torch_threads = torch_threads or default_torch_threads(len(gpu.services))
        self.preset_dir = Path(preset_dir) if preset_dir else None
        self._tenants = tenants
        self._lock = threading.Lock()           # guards _slots and the arbiter
        self._slots: dict[str, _Slot] = {}
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        self.device, capacity = self._local_device()
        self.arbiter = MemoryArbiter.for_device(gpu, config, capacity=capacity)
        self.store = WeightStore(self.device)
        self.node_id = ray.get_runtime_context().get_node_id()

    def _local_device(self) -> tuple[str, int | None]:
        """The device as this process names it, and its capacity if the YAML has none.

        On CUDA, Ray gives this actor one GPU and makes it cuda:0 here (the YAML's
        index only names the entry); NVML indices ignore that remapping, so the
        capacity is read through torch instead."""
        if not self.gpu.is_cuda:
            return "cpu", None
        import torch
        return "cuda:0", self.gpu.memory or torch.cuda.mem_get_info(0)[1]

    # ---- starting ------------------------------------------------------------
    def start(self) -> None:
        """Admit every service, publish the weights, start the service actors.

        Admission comes first: a deployment that does not fit is refused before a
        single weight is read. Raises DeploymentError with an operator's message."""
        self._start_metrics()
        try:
            self._admit_all()
            launches = self._prepare_launches()
        except AdmissionRefused as exc:
            raise DeploymentError(f"service {exc.demand.service} refused: {exc}") from None
        except DeploymentError:
            self._release_all()
            raise
        with self._lock:
            for launch in launches:
                self._slots[launch.spec.name] = _Slot(launch, actor=self._spawn(launch))

    def _start_metrics(self) -> None:
        port = self.gpu.metrics_port or 0
        try:
            self.metrics = MetricsEndpoint(self.metrics_sample, self.metrics_host, port)
        except OSError as exc:
            raise DeploymentError(f"{self.gpu.device}: cannot serve metrics on "
                                  f"{self.metrics_host}:{port}: {exc}") from None
        log.info("metrics of %s at %s", self.gpu.device, self.metrics.url)

    def _admit_all(self) -> None:
        for service in self.gpu.services:
            try:
                self.arbiter.admit(service)
            except AdmissionRefused:
                self._release_all()
                raise

    def _release_all(self) -> None:
        for demand in self.arbiter.admitted():
            self.arbiter.release(demand.service)

    def _prepare_launches(self) -> list[ServiceLaunch]:
        demands = {d.service: d for d in self.arbiter.admitted()}
        launches = []
        for service in self.gpu.services:
            model = self.config.models[service.model]
            # Unshared: one published copy per service, under the service's own name.
            name = model.name if self.gpu.share_weights else f"{model.name}@{service.name}"
            try:
                path = checkpoint_dir(model, self.preset_dir)
                handle = self.store.publish(name, path, model.dtype,
                                            quantization=model.quantization,
                                            quant_group_size=model.quant_group_size)
            except (OSError, ValueError) as exc:    # missing files, bad shapes or dtype
                raise DeploymentError(f"service {service.name}: cannot load model "
                                      f"{model.name} from {model.path}: {exc}") from None
            launches.append(ServiceLaunch(
                spec=service, weights=handle, checkpoint_dir=str(path),
                kv_tokens=demands[service.name].kv_tokens, device=self.device,
                host=self.host, torch_threads=self.torch_threads,
                weights_shared=self.gpu.share_weights,
                kv_budget_bytes=demands[service.name].kv_bytes,
                tenants=dict(self._tenants.get(service.name, {}))))
        return launches

    def _spawn(self, launch: ServiceLaunch):
        """Start one service actor on this node (it must map this node's files)."""
        options = dict(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False))
        if self.gpu.is_cuda:
            # Share this actor's GPU without reserving another: services take no
            # GPU resource, and see the supervisor's physical GPU as cuda:0.
            physical = ",".join(str(i) for i in ray.get_gpu_ids())
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": physical}}
        return ServiceActor.options(**options).remote(launch)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Block until every service answers, then start health checks; status()."""
        with self._lock:
            slots = list(self._slots.values())
        for slot in slots:
            if not self._await_start(slot, timeout):
                raise DeploymentError(f"service {slot.name} on {self.gpu.device} did not "
                                      f"start: {slot.error}")
        if self._health_thread is None:
            self._health_thread = threading.Thread(target=self._health_loop, daemon=True,
                                                   name=f"health-{self.gpu.device}")
            self._health_thread.start()
        return self.status()

    def _await_start(self, slot: _Slot, timeout: float) -> bool:
        try:
            ok = ray.get(slot.actor.ping.remote(), timeout=timeout)
            slot.error = "" if ok else "engine loop is not running"
        except (RayActorError, GetTimeoutError) as exc:
            ok, slot.error = False, _summary(exc)
        with self._lock:
            slot.state = "running" if ok else "failed"
            slot.missed_pings = 0
        return ok

    # ---- health checks and restarts ------------------------------------------
    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            try:
                self.check_once()
            except Exception:        # never let one bad round end the checks
                log.exception("health check on %s failed", self.gpu.device)

    def check_once(self) -> list[str]:
        """Ping every service; restart those that need it. Returns their names."""
        with self._lock:
            slots = [s for s in self._slots.values() if s.state in ("running", "failed")]
        pings = {s.name: (s, s.actor.ping.remote()) for s in slots if s.state == "running"}
        doomed = [s for s in slots if s.state == "failed"]
        for slot, ref in pings.values():
            if not self._healthy(slot, ref):
                doomed.append(slot)
        for slot in doomed:
            if not self._stop.is_set():
                self._restart(slot)
        return [s.name for s in doomed]

    def _healthy(self, slot: _Slot, ref) -> bool:
        try:
            alive = ray.get(ref, timeout=PING_TIMEOUT_S)
        except RayActorError as exc:
            slot.error = f"died: {_summary(exc)}"
            return False
        except GetTimeoutError:
            # A service busy with a long prefill may be slow to answer; only a
            # run of missed pings counts as hung.
            slot.missed_pings += 1
            slot.error = f"missed {slot.missed_pings} pings"
            return slot.missed_pings < MISSED_PINGS_BEFORE_RESTART
        slot.missed_pings = 0
        if not alive:
            slot.error = "engine loop stopped"
        return bool(alive)

    def _restart(self, slot: _Slot) -> None:
        log.warning("restarting service %s on %s (%s)", slot.name, self.gpu.device,
                    slot.error)
        with self._lock:
            slot.state = "restarting"
            ray.kill(slot.actor, no_restart=True)     # a hung one must free its port
            # Give the budget back, then book it again: the ledger never holds it twice.
            # (It was not booked if an earlier restart was refused.)
            if any(d.service == slot.name for d in self.arbiter.admitted()):
                self.arbiter.release(slot.name)
            try:
                demand = self.arbiter.admit(slot.launch.spec)
            except AdmissionRefused as exc:   # the books changed under it; retried later
                slot.state, slot.error = "failed", str(exc)
                return
            slot.launch = replace(slot.launch, kv_tokens=demand.kv_tokens)
            slot.actor = self._spawn(slot.launch)
            slot.restarts += 1
        self._await_start(slot, STARTUP_TIMEOUT_S)

    # ---- observing -----------------------------------------------------------
    def service_actor(self, name: str):
        """The actor handle of one service (tests kill it; tools read its stats)."""
        with self._lock:
            return self._slots[name].actor

    def status(self, with_stats: bool = True) -> dict:
        """Per service: state, restarts, endpoint and (if it answers) its stats;
        and the device's ledger."""
        with self._lock:
            slots = list(self._slots.values())
            rows = [(r.item, r.bytes, r.service) for r in self.arbiter.ledger()]
            reserved, capacity = self.arbiter.reserved_bytes, self.arbiter.capacity
        stats = self._ask_running(slots, "stats") if with_stats else {}
        services = [dict(name=s.name, state=s.state, restarts=s.restarts, error=s.error,
                         port=s.launch.spec.port, host=s.launch.host,
                         kv_tokens=s.launch.kv_tokens, stats=stats.get(s.name))
                    for s in slots]
        return dict(device=self.gpu.device, node_ip=get_node_ip_address(),
                    services=services, ledger=rows,
                    reserved_bytes=reserved, capacity_bytes=capacity,
                    weight_store_bytes=self.store.total_bytes(),
                    weight_copies=len(self.store.models()),
                    metrics_url=self.metrics.url if self.metrics else None)

    def metrics_sample(self) -> DeviceSample:
        """What /metrics shows; the endpoint's thread calls it at every scrape."""
        with self._lock:
            slots = list(self._slots.values())
        reports = self._ask_running(slots, "metrics", SCRAPE_TIMEOUT_S)
        restarts = {s.name: s.restarts for s in slots}
        with self._lock:
            return device_sample(self.gpu, self.config, self.arbiter, self.store,
                                 self.device, {name: (report, restarts[name])
                                               for name, report in reports.items()})

    def _ask_running(self, slots: list[_Slot], method: str,
                     timeout: float = PING_TIMEOUT_S) -> dict:
        """service name -> what `method` returned, for the running services that answer."""
        refs = {s.name: getattr(s.actor, method).remote()
                for s in slots if s.state == "running"}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout)
            except (RayActorError, GetTimeoutError):
                pass                 # the health loop deals with it
        return out

    # ---- stopping ------------------------------------------------------------
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the checks, stop every service, release the budgets and the weights."""
        if self.metrics is not None:     # first, so no scrape calls a stopping service
            self.metrics.stop()
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join(timeout)
        with self._lock:
            slots = list(self._slots.values())
        refs = [s.actor.shutdown.remote() for s in slots if s.state != "stopped"]
        try:
            ray.get(refs, timeout=timeout)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("a service did not stop cleanly: %s", _summary(exc))
        with self._lock:
            for slot in slots:
                ray.kill(slot.actor, no_restart=True)
                slot.state = "stopped"
            self._release_all()
            self.store.close()


def _summary(exc: BaseException) -> str:
    """The last line of a (possibly remote) error: Ray puts the cause there."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


# No CPU reservation (it would idle a core on a 2-core host); on CUDA the driver adds
# num_gpus=1. Threaded, so status() answers while wait_ready() or a restart waits.
GPUSupervisor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(Supervisor)
