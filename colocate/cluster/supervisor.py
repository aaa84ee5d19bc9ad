"""GPUSupervisor: one device's weights, its ledger, and the services running on it.

One supervisor per `gpus[]` entry, placed by the driver (fleet.py) on a node with
room for it, as the named actor `colocate/<deployment>/<entry>`. It books every
service with the MemoryArbiter before anything is loaded (a refusal names the service
and the shortfall), publishes each model once in the WeightStore (once per service with
share_weights: false), starts a ServiceActor per service, then health-checks them.

A service that dies, or fails its health checks several times in a row
(health_monitor.py), is restarted alone: its budget goes back to the ledger first and
is booked again, so the ledger reads the same before and after, and the other
services never notice. Every admission also goes through the device's shared ledger
(admission.py), so two supervisors on one device cannot book the same bytes.

It also serves the device's one /metrics endpoint (on the YAML's `metrics_port`, a
free port if none): each scrape asks the running services for their statistics over
Ray and adds the ledger, the weight store and the memory measured per process.

Ray owns the service actors through this actor: if the supervisor dies, Ray kills its
services too, and the weight store's files are swept by the next store on the host.
"""
from __future__ import annotations

import collections
import logging
import os
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util import get_node_ip_address
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from colocate import progress
from colocate.config import DeploymentConfig, DeviceSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.cuda_devices import gpu_uuid
from colocate.memory.shared_ledger import SharedLedger, default_dir
from colocate.memory.weight_store import WeightStore
from colocate.metrics.device import device_sample
from colocate.metrics.endpoint import MetricsEndpoint
from colocate.metrics.samples import DeviceSample
from colocate.cluster.admission import DeviceAdmission
from colocate.cluster.health_monitor import HealthMonitor, ServiceSlot, summary
from colocate.cluster.live_change import LiveChanges
# Re-exported: the driver and tests know these by the supervisor's name.
from colocate.cluster.launch import (DeploymentError, checkpoint_dir,  # noqa: F401
                                     join_lending_circles, remove_pool_files,
                                     default_torch_threads, preset_checkpoint,
                                     prepare_launches, process_groups, service_cuda_env)
from colocate.service.group_runtime import GroupRuntime, MemberHandle
from colocate.service.runtime import ServiceLaunch, ServiceRuntime

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0       # a 13B model maps fast, but CUDA init and warm-up do not
PING_TIMEOUT_S = 10.0
SCRAPE_TIMEOUT_S = 2.0          # a slow service drops out of one scrape, not all of it
FAILED_CHECKS_BEFORE_RESTART = 3
SHUTDOWN_GRACE_S = 10.0         # for requests in flight when a stop begins
EVENTS_KEPT = 200


# No CPU reservation: the services of a device share its cores (the torch thread
# count is the real limit), and a 2-core machine must host three of them plus the
# supervisor. No restarts by Ray either: the supervisor restarts a dead service itself,
# after returning its budget to the ledger. max_concurrency lets ping and stats answer
# while shutdown waits for in-flight calls to drain.
ServiceActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)(ServiceRuntime)
# A fused group's process: the same, for every service of one model on the device.
GroupActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(GroupRuntime)


def ray_actor(handle):
    """The Ray actor behind a slot's handle (a fused member's is its group's)."""
    return handle.actor if isinstance(handle, MemberHandle) else handle


# ---- the supervisor ------------------------------------------------------------------

class Supervisor(LiveChanges):
    """The supervisor's logic; GPUSupervisor below is this class as a Ray actor.
    Live changes (colocate apply) are in live_change.py."""

    def __init__(self, gpu: DeviceSpec, config: DeploymentConfig, *,
                 tenants: dict[str, dict[str, str]], host: str = "127.0.0.1",
                 torch_threads: int | None = None, health_interval_s: float = 2.0,
                 health_timeout_s: float = PING_TIMEOUT_S,
                 failed_checks_before_restart: int = FAILED_CHECKS_BEFORE_RESTART,
                 preset_dir: str | None = None, metrics_host: str | None = None,
                 ledger_dir: str | None = None, test_hooks: str | None = None,
                 replacement: int = 0) -> None:
        """tenants: service name -> {token: tenant name}, resolved by the driver.
        metrics_host: where /metrics listens; default `host`. ledger_dir: where the
        device's shared ledger lives (default /dev/shm). test_hooks: tests only, the
        "module:factory" each service makes its fault hooks from (service/test_hooks.py,
        ServiceRuntime.inject_fault). replacement:
        how many times this entry has been re-placed after a lost node (metrics)."""
        self.gpu = gpu
        self.replacement = replacement
        self.config = config
        self.host = host
        self.metrics_host = metrics_host or host
        self.metrics: MetricsEndpoint | None = None
        processes = (len({s.model for s in gpu.services}) if gpu.batching == "fused"
                     else len(gpu.services))
        self.torch_threads = torch_threads or default_torch_threads(processes)
        self.preset_dir = Path(preset_dir) if preset_dir else None
        self.test_hooks = test_hooks
        self._tenants = tenants
        self._lock = threading.Lock()           # guards _slots, the admission and _events
        self._change_lock = threading.Lock()    # one live change at a time
        self._slots: dict[str, ServiceSlot] = {}
        self._events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self.progress = progress.Recorder()     # loading, publishing, starting: for the driver
        self.device, capacity = self._local_device()
        self.arbiter = MemoryArbiter.for_device(gpu, config, capacity=capacity)
        self.admission = DeviceAdmission(self.arbiter, SharedLedger(
            self._ledger_key(), ledger_dir, label=f"supervisor of {gpu.device} "
                                                  f"({', '.join(s.name for s in gpu.services)})"))
        self.store = WeightStore(self.device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.monitor = HealthMonitor(
            self._watched, self._restart, interval_s=health_interval_s,
            timeout_s=health_timeout_s, failures_before_restart=failed_checks_before_restart,
            name=gpu.device)

    def _local_device(self) -> tuple[str, int | None]:
        """The device as this process names it, and its capacity if the YAML has none.

        On CUDA, Ray gives this actor one GPU and makes it cuda:0 here (the YAML's
        index only names the entry); NVML indices ignore that remapping, so the
        capacity is read through torch instead."""
        if not self.gpu.is_cuda:
            return "cpu", None
        import torch
        return "cuda:0", self.gpu.memory or torch.cuda.mem_get_info(0)[1]

    def _ledger_key(self) -> str:
        """The physical device, as every supervisor on this host names it: by UUID, not
        by Ray's GPU id, which counts within the raylet's CUDA_VISIBLE_DEVICES (two
        `colocate serve` runs started with different lists would call one GPU 0 and 1)."""
        if not self.gpu.is_cuda:
            return "cpu"
        return gpu_uuid(self.device)

    def _event(self, service: str, what: str, detail: str = "") -> None:
        """Under _lock: remember a lifecycle event (status() reports them)."""
        self._events.append(dict(time=time.time(), service=service, event=what,
                                 detail=detail))

    # ---- starting ------------------------------------------------------------
    def start(self) -> None:
        """Admit every service (first: a deployment that does not fit is refused before a
        weight is read), publish the weights, start the actors. Raises DeploymentError."""
        self._start_metrics()
        try:
            with self._lock:
                for service in self.gpu.services:
                    self.admission.admit(service)
                    self._event(service.name, "admitted")
            demands = {d.service: d for d in self.arbiter.admitted()}
            with progress.using(self.progress):
                launches = prepare_launches(
                    self.gpu, self.config, self.store, demands, device=self.device,
                    host=self.host, torch_threads=self.torch_threads, tenants=self._tenants,
                    preset_dir=self.preset_dir, test_hooks=self.test_hooks)
            launches = join_lending_circles(self.gpu, launches, default_dir(),
                                            f"{os.getpid()}-{secrets.token_hex(3)}")
        except AdmissionRefused as exc:
            self.admission.release_all()
            raise DeploymentError(f"service {exc.demand.service} refused: {exc}") from None
        except DeploymentError:
            self.admission.release_all()
            raise
        with self._lock:
            for group in process_groups(self.gpu, launches):
                for launch, handle in zip(group, self._spawn(group)):
                    self._slots[launch.spec.name] = ServiceSlot(launch, actor=handle)

    def _start_metrics(self) -> None:
        port = self.gpu.metrics_port or 0
        try:
            self.metrics = MetricsEndpoint(self.metrics_sample, self.metrics_host, port)
        except OSError as exc:
            raise DeploymentError(f"{self.gpu.device}: cannot serve metrics on "
                                  f"{self.metrics_host}:{port}: {exc}") from None
        log.info("metrics of %s at %s", self.gpu.device, self.metrics.url)

    def _spawn(self, launches: list[ServiceLaunch]) -> list:
        """Start one service process on this node (it must map this node's files) for
        `launches`: a service actor, or a fused group's actor; a handle per service."""
        options = dict(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False))
        if self.gpu.is_cuda:
            # Share this actor's GPU without reserving another: services take no
            # GPU resource, and see the supervisor's physical GPU as cuda:0.
            physical = ",".join(str(i) for i in ray.get_gpu_ids())
            options["runtime_env"] = {"env_vars": service_cuda_env(physical)}
        if self.gpu.batching != "fused":
            return [ServiceActor.options(**options).remote(launches[0])]
        actor = GroupActor.options(**options).remote(launches)
        return [MemberHandle(actor, launch.spec.name) for launch in launches]

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Block until every service answers, then start health checks; status()."""
        with self._lock:
            slots = list(self._slots.values())
        with progress.Stage(self.progress, "starting services", len(slots), "service") as bar:
            for slot in slots:
                if not self._await_start(slot, timeout):
                    raise DeploymentError(f"service {slot.name} on {self.gpu.device} did "
                                          f"not start: {slot.error}")
                bar.advance(1)
        self.monitor.start()
        return self.status()

    def progress_events(self, since: int = 0) -> list[tuple]:
        return self.progress.events(since)      # the driver shows them (progress_relay.py)

    def _await_start(self, slot: ServiceSlot, timeout: float) -> bool:
        try:
            ok = ray.get(slot.actor.ping.remote(), timeout=timeout)
            slot.error = "" if ok else "engine loop is not running"
        except (RayActorError, GetTimeoutError) as exc:
            ok, slot.error = False, summary(exc)
        with self._lock:
            slot.state = "running" if ok else "failed"
            slot.failed_checks = 0
        return ok

    # ---- restarts ------------------------------------------------------------
    def _watched(self) -> list[ServiceSlot]:
        with self._lock:
            return list(self._slots.values())

    def check_once(self) -> list[str]:
        """One health round now (tests; the monitor's thread runs them on its own)."""
        return self.monitor.check_once()

    def _peers(self, slot: ServiceSlot) -> list[ServiceSlot]:
        """Under _lock: the slots whose services share slot's process, slot first."""
        actor = ray_actor(slot.actor)
        return [slot] + [s for s in self._slots.values()
                         if s is not slot and ray_actor(s.actor) is actor]

    def _still_serving(self, slot: ServiceSlot) -> bool:
        """A fused member found failing in the same round as a peer is restarted with
        that peer's group: asked again, it answers from the new process."""
        try:
            return bool(ray.get(slot.actor.ping.remote(), timeout=PING_TIMEOUT_S))
        except (RayActorError, GetTimeoutError):
            return False

    def _restart(self, slot: ServiceSlot) -> None:
        """Replace slot's process: a service alone, or its whole fused group."""
        if isinstance(slot.actor, MemberHandle) and self._still_serving(slot):
            return
        began = time.monotonic()
        with self._lock:
            if self._slots.get(slot.name) is not slot or slot.state == "stopping":
                return                   # a live change is stopping or removed it
            peers = self._peers(slot)
            log.warning("restarting %s on %s (%s)", ", ".join(p.name for p in peers),
                        self.gpu.device, slot.error)
            ray.kill(ray_actor(slot.actor), no_restart=True)   # a hung one must free its port
            for peer in peers:
                self._event(peer.name, "restarting", slot.error)
                peer.state = "restarting"
                # Give the budget back, then book it again: the ledger never holds it
                # twice. (It was not booked if an earlier restart was refused.)
                if self.admission.is_admitted(peer.name):
                    self.admission.release(peer.name)
                    self._event(peer.name, "released")
            for peer in peers:
                try:
                    demand = self.admission.admit(peer.launch.spec)
                except AdmissionRefused as exc:   # the books changed; retried later
                    for p in peers:
                        if self.admission.is_admitted(p.name):
                            self.admission.release(p.name)
                        p.state, p.error = "failed", str(exc)
                    self._event(peer.name, "refused", str(exc))
                    return
                self._event(peer.name, "admitted")
                # The killed process's IPC lease ends; the new one gets its own.
                self.store.end_share(peer.launch.weights)
                peer.launch = replace(peer.launch, kv_tokens=demand.kv_tokens,
                                      weights=self.store.share(peer.launch.weights.model_name))
                peer.restarts += 1
            for peer, handle in zip(peers, self._spawn([p.launch for p in peers])):
                peer.actor = handle
        for peer in peers:
            if self._await_start(peer, STARTUP_TIMEOUT_S):
                with self._lock:
                    peer.last_restart_s = time.monotonic() - began
                    self._event(peer.name, "healthy", f"{peer.last_restart_s:.2f} s after "
                                                      f"the restart began")

    # ---- observing -----------------------------------------------------------
    def service_actor(self, name: str):
        """The actor handle of one service (tests kill it; tools read its stats)."""
        with self._lock:
            return self._slots[name].actor

    def events(self) -> list[dict]:
        """The latest lifecycle events: admitted, released, restarting, healthy, ..."""
        with self._lock:
            return list(self._events)

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
                         kv_tokens=s.launch.kv_tokens, last_restart_s=s.last_restart_s,
                         stats=stats.get(s.name))
                    for s in slots]
        return dict(device=self.gpu.device, entry=self.gpu.entry_name, state="running",
                    node_id=self.node_id, node_ip=get_node_ip_address(),
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
                                               for name, report in reports.items()},
                                 replacements=self.replacement,
                                 slot_states={s.name: s.state for s in slots})

    def _ask_running(self, slots: list[ServiceSlot], method: str,
                     timeout: float = PING_TIMEOUT_S) -> dict:
        """service name -> what `method` returned, for the running services that answer."""
        refs = {s.name: getattr(s.actor, method).remote()
                for s in slots if s.state == "running"}
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref, timeout=timeout)
            except (RayActorError, GetTimeoutError):
                pass                 # the health monitor deals with it
        return out

    # ---- stopping ------------------------------------------------------------
    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop the checks, drain the services (`grace` s; new calls refused), stop, release."""
        self.monitor.stop()
        with self._lock:     # /metrics says draining; scrapes ask only running services
            slots = [s for s in self._slots.values() if s.state != "stopped"]
            refs = [s.actor.shutdown.remote(grace) for s in slots]
            for slot in slots:
                slot.state = "draining"
        try:
            ray.get(refs, timeout=grace + 30.0)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("a service did not stop cleanly: %s", summary(exc))
        if self.metrics is not None:
            self.metrics.stop()
        with self._lock:
            for slot in slots:
                ray.kill(ray_actor(slot.actor), no_restart=True)
                self.store.end_share(slot.launch.weights)
                slot.state = "stopped"
            for circle in {s.launch.kv_circle for s in self._slots.values()} - {None}:
                remove_pool_files(circle)
            self.admission.close()
            self.store.close()


# No CPU reservation (it would idle a core on a 2-core host); the driver adds the
# entry's placement bundle: num_gpus=1 on CUDA, a colocate_cpu_device on CPU. Threaded, so status() answers while wait_ready() or a restart waits.
GPUSupervisor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=8)(Supervisor)
