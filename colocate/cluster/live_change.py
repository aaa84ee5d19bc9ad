"""Live changes to a running device entry: what differs, whether it fits, doing it.

`colocate apply NEW.yaml` (and SIGHUP to `colocate serve`) hands every supervisor its
entry of the new YAML. Each works out what differs from what it runs (DeviceChange):
services to add, to remove, and to restart because their spec changed (a budget, a
limit, a tenant's token). Every other service is left alone, so its streams go on.

Nothing changes before the entry's whole new plan is checked: a scratch arbiter books
every service of the new entry against the device's capacity, less what the other
supervisors of the device hold in the shared ledger. The driver (apply.py) asks every
entry first and applies only when all fit, so a change that does not fit changes
nothing, and the refusal is the plan's own message. Then a removed or changed
service is drained (its requests in flight get `grace` seconds), stopped and its
budget released; a changed or new one is admitted, published and started.

Refused, naming what, because it needs a restart of the deployment instead: a changed
device key (memory, batching, share_weights, ...), a changed model that services of
the entry keep using (its published copy would be stale), any change to a fused
entry (its services share one process: restarting one restarts them all), and any
change to the services of an isolated lending circle (their block ranges of one pool
file are fixed when it starts: colocate/engine/shared_lending.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from colocate.config import DeploymentConfig, DeviceSpec, ServiceSpec
from colocate.memory.arbiter import AdmissionRefused, MemoryArbiter
from colocate.memory.sizing import ModelFootprint
from colocate.sizes import format_size
from colocate.cluster.health_monitor import ServiceSlot
from colocate.cluster.launch import DeploymentError, prepare_launches

log = logging.getLogger(__name__)


class ChangeRefused(DeploymentError):
    """A live change that cannot be made as asked; nothing was changed."""


@dataclass(frozen=True)
class DeviceChange:
    entry: str
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.restart)

    def summary(self) -> str:
        parts = [f"{verb} {', '.join(names)}" for verb, names in
                 (("add", self.add), ("remove", self.remove), ("restart", self.restart))
                 if names]
        return f"{self.entry}: {'; '.join(parts) or 'unchanged'}"


def diff_device(old: DeviceSpec, old_config: DeploymentConfig, new: DeviceSpec,
                new_config: DeploymentConfig) -> DeviceChange:
    """What a live change does to one entry, or ChangeRefused saying why it cannot."""
    entry = old.entry_name
    for f in fields(DeviceSpec):
        if f.name != "services" and getattr(old, f.name) != getattr(new, f.name):
            raise ChangeRefused(f"{entry}: gpus[].{f.name} changed ({getattr(old, f.name)!r} "
                                f"-> {getattr(new, f.name)!r}); a device key needs a restart "
                                "of the deployment")
    before = {s.name: s for s in old.services}
    after = {s.name: s for s in new.services}
    for model in sorted({s.model for s in old.services} & {s.model for s in new.services}):
        if old_config.models[model] != new_config.models[model]:
            raise ChangeRefused(f"{entry}: models.{model} changed while services of this "
                                "entry use it; a changed model needs a restart of the "
                                "deployment")
    change = DeviceChange(
        entry, add=tuple(n for n in after if n not in before),
        remove=tuple(n for n in before if n not in after),
        restart=tuple(n for n in after if n in before and after[n] != before[n]))
    if old.batching == "fused" and not change.empty:
        raise ChangeRefused(f"{entry}: batching: fused runs its services in one process; "
                            f"changing them ({change.summary()}) needs a restart")
    circles = {_circle(s) for s in (*old.services, *new.services) if s.kv_cache.lend}
    touched = sorted(n for n in (*change.add, *change.remove, *change.restart)
                     if _circle(after.get(n) or before[n]) in circles)
    if touched:
        raise ChangeRefused(f"{entry}: {', '.join(touched)} share(s) a lending circle's one KV "
                            "pool file (kv_cache.lend: every block range is fixed when the "
                            f"circle starts); changing them ({change.summary()}) needs a restart")
    return change


def _circle(service: ServiceSpec) -> tuple[str, str]:
    """Which isolated lending circle a service would be in (launch.join_lending_circles)."""
    return service.model, service.kv_cache.dtype


def check_fits(new: DeviceSpec, config: DeploymentConfig, capacity: int,
               elsewhere: int = 0) -> None:
    """The entry's whole new plan, booked in a scratch arbiter; ChangeRefused with the
    plan's message if a service does not fit. `elsewhere`: bytes other supervisors of
    the device hold (the shared ledger)."""
    scratch = MemoryArbiter.for_device(new, config, capacity=capacity - elsewhere)
    for service in new.services:
        try:
            scratch.admit(service)
        except AdmissionRefused as exc:
            held = (f" ({format_size(elsewhere)} of the device held by other supervisors)"
                    if elsewhere else "")
            raise ChangeRefused(f"{new.entry_name}: the new plan does not fit{held}: "
                                f"service {service.name} refused: {exc}") from None


class LiveChanges:
    """A supervisor's half of a live change. Mixed into Supervisor, whose slots,
    admission, weight store and spawning it drives under the supervisor's lock."""

    def apply_change(self, gpu: DeviceSpec, config: DeploymentConfig,
                     tenants: dict[str, dict[str, str]], *, dry_run: bool = False,
                     grace: float = 10.0) -> str:
        """Check (dry_run) or make the change to `gpu`; a one-line summary of it."""
        with self._change_lock:
            change = diff_device(self.gpu, self.config, gpu, config)
            check_fits(gpu, config, self.arbiter.capacity, self.admission.others_bytes())
            if dry_run or change.empty:
                return change.summary()
            log.info("live change on %s", change.summary())
            for name in change.remove + change.restart:
                self._stop_service(name, grace)
            with self._lock:
                self.gpu, self.config = gpu, config
                self._tenants = dict(tenants)
            self._start_services([s for s in gpu.services
                                  if s.name in change.add + change.restart])
            self._release_unused_models()
            return change.summary()

    def _stop_service(self, name: str, grace: float) -> None:
        """Drain and stop one service, return its budget; its slot goes."""
        with self._lock:
            slot = self._slots[name]
            slot.state = "stopping"              # the health monitor leaves it alone
            self._event(name, "stopping")
        try:
            ray.get(slot.actor.shutdown.remote(grace), timeout=grace + 30.0)
        except (RayActorError, GetTimeoutError) as exc:
            log.warning("service %s did not stop cleanly: %s", name, exc)
        with self._lock:
            ray.kill(slot.actor, no_restart=True)
            self.store.end_share(slot.launch.weights)
            if self.admission.is_admitted(name):
                self.admission.release(name)
            slot.state = "stopped"
            del self._slots[name]
            self._event(name, "released")

    def _start_services(self, specs: list[ServiceSpec]) -> None:
        """Admit, publish and start `specs` (the change was checked to fit); wait
        until each answers. One that does not come up is left `failed`, and the
        health monitor retries it like any failed service."""
        started: list[ServiceSlot] = []
        with self._lock:
            for model in {s.model for s in specs}:
                self.arbiter.know_model(model, ModelFootprint.of(self.config.models[model]))
            for spec in specs:
                self.admission.admit(spec)
                self._event(spec.name, "admitted")
            demands = {d.service: d for d in self.arbiter.admitted()}
            launches = prepare_launches(
                replace(self.gpu, services=tuple(specs)), self.config, self.store, demands,
                device=self.device, host=self.host, torch_threads=self.torch_threads,
                tenants=self._tenants, preset_dir=self.preset_dir, test_hooks=self.test_hooks)
            for launch in launches:
                slot = ServiceSlot(launch, actor=self._spawn([launch])[0])
                self._slots[slot.name] = slot
                started.append(slot)
            # Keep the YAML's order, which status() and the metrics follow.
            order = [s.name for s in self.gpu.services]
            self._slots = {n: self._slots[n] for n in order if n in self._slots}
        for slot in started:
            self._await_start(slot, 300.0)

    def _release_unused_models(self) -> None:
        """Drop the published copies no service maps any more (their ledger rows went
        with their last service's release)."""
        with self._lock:
            used = {s.launch.weights.model_name for s in self._slots.values()}
            for name in set(self.store.models()) - used:
                self.store.release(name)
