"""Fleet: a deployment's supervisors, one per device entry: where each runs, and what
happens when its node goes.

The fleet places every entry at once (placement.py), starts each supervisor as a
named actor in its bundle, and then, from a background thread, watches the nodes
they run on. When a node leaves the cluster its entries are marked `lost` (their
services reported unhealthy), logged, and recorded in the deployment's record
(registry.py). An entry whose YAML says `restart: anywhere` is then re-placed on
any live node with room, ignoring its pin, each round until it fits: a new bundle,
a new supervisor under the same name, its services started afresh. Entries left
on live nodes are never touched.

Only node loss is handled here; a service that dies on a live node is its
supervisor's business (health_monitor.py).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from colocate.config import DeploymentConfig, DeviceSpec
from colocate.cluster import placement
from colocate.cluster.launch import DeploymentError
from colocate.cluster.placement import Node, PlacementError, Slot
from colocate.cluster.registry import (NAMESPACE, DeploymentRecord, record_name,
                                       supervisor_name)

log = logging.getLogger(__name__)

# make_supervisor(gpu, actor options) -> actor handle; the Deployment supplies it.
SupervisorFactory = Callable[[DeviceSpec, dict], object]


@dataclass
class Placed:
    """One device entry as the fleet tracks it."""
    slot: Slot
    actor_name: str
    host: str                         # where its services' gRPC servers listen
    actor: object | None = None
    group: object | None = None       # the placement group holding its bundle
    bundle: int = 0
    state: str = "running"            # running | lost | replacing
    error: str = ""
    lost_because: str = ""
    replacements: int = 0

    @property
    def entry(self) -> str:
        return self.slot.gpu.entry_name

    def row(self) -> dict:
        gpu = self.slot.gpu
        return dict(entry=self.entry, index=self.slot.index, device=gpu.device,
                    node_id=self.slot.node.node_id, node_ip=self.slot.node.ip,
                    pin=gpu.node, restart=gpu.restart, state=self.state, error=self.error,
                    replacements=self.replacements, supervisor=self.actor_name,
                    host=self.host, services=[(s.name, s.port) for s in gpu.services])


class Fleet:
    def __init__(self, config: DeploymentConfig, name: str, make: SupervisorFactory, *,
                 host: str = "127.0.0.1",
                 placement_timeout_s: float = placement.PLACEMENT_TIMEOUT_S) -> None:
        """host: where the services listen (the Deployment's), for status rows."""
        self.config = config
        self.name = name
        self.host = host
        self._make = make
        self.placement_timeout_s = placement_timeout_s
        self._lock = threading.Lock()        # guards _placed
        self._checking = threading.Lock()    # one node check at a time (thread or caller)
        self._placed: dict[str, Placed] = {}
        self._groups: list = []
        self.events: collections.deque[dict] = collections.deque(maxlen=200)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready_timeout_s = 300.0        # set by watch()
        self.record = None

    # ---- placing ---------------------------------------------------------------
    def place(self) -> None:
        """Plan every entry, reserve them as one group, create their supervisors.
        Raises PlacementError (naming the entry) before any supervisor exists."""
        slots = placement.plan(list(enumerate(self.config.gpus)), placement.alive_nodes())
        group = placement.reserve(slots, f"colocate/{self.name}", self.placement_timeout_s)
        self._groups.append(group)
        driver_node = ray.get_runtime_context().get_node_id()
        try:
            # On the driver's node: the record must outlive any worker node.
            self.record = DeploymentRecord.options(
                name=record_name(self.name), namespace=NAMESPACE,
                scheduling_strategy=_on_node(driver_node)).remote(self.name, self.config.source)
        except ValueError as exc:       # the name is taken
            raise DeploymentError(f"a deployment named {self.name!r} already runs on this "
                                  f"cluster ({exc}); give this one another `name:`") from None
        for i, slot in enumerate(slots):
            placed = Placed(slot, supervisor_name(self.name, slot.gpu.entry_name), self.host,
                            group=group, bundle=i)
            placed.actor = self._spawn(placed)
            self._placed[placed.entry] = placed
            self._publish(placed, "placed", f"on node {slot.node.short}")

    def _spawn(self, placed: Placed, replacement: int = 0):
        """Start the entry's supervisor; `replacement` counts re-placements so far,
        this one included, for the supervisor's metrics."""
        options = dict(name=placed.actor_name, namespace=NAMESPACE,
                       scheduling_strategy=placement.in_bundle(placed.group, placed.bundle),
                       **placed.slot.actor_resources)
        return self._make(placed.slot.gpu, options, replacement)

    def _publish(self, placed: Placed, what: str, detail: str = "") -> None:
        """Log-worthy change of one entry: remember it and tell the record."""
        self.events.append(dict(time=time.time(), entry=placed.entry, event=what,
                                detail=detail))
        if self.record is not None:
            self.record.set_entry.remote(placed.row())
            self.record.event.remote(placed.entry, what, detail)

    # ---- reading -----------------------------------------------------------------
    def actors(self) -> dict[str, object]:
        """entry name -> supervisor, for the entries running now."""
        with self._lock:
            return {p.entry: p.actor for p in self._placed.values() if p.state == "running"}

    def placed(self) -> list[Placed]:
        with self._lock:
            return list(self._placed.values())

    @property
    def replacements(self) -> int:
        return sum(p.replacements for p in self.placed())

    # ---- watching ----------------------------------------------------------------
    def watch(self, interval_s: float, ready_timeout_s: float) -> None:
        """Check the nodes every interval_s from a background thread."""
        self._ready_timeout_s = ready_timeout_s
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(interval_s,),
                                            daemon=True, name=f"fleet-{self.name}")
            self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check_nodes()
            except Exception:          # never let one bad round end the watch
                log.exception("node check of %s failed", self.name)

    def check_nodes(self) -> list[str]:
        """One round: mark the entries of departed nodes lost; try to re-place the
        lost ones that may move. Returns the entries lost in this round."""
        with self._checking:
            return self._check_nodes()

    def _check_nodes(self) -> list[str]:
        nodes = placement.alive_nodes()
        alive = {n.node_id for n in nodes}
        newly_lost = []
        for p in self.placed():
            if p.state == "running" and p.slot.node.node_id not in alive:
                newly_lost.append(p.entry)
                self._lose(p)
        for p in self.placed():
            if p.state == "lost" and p.slot.gpu.restart == "anywhere" and not self._stop.is_set():
                self._replace(p, nodes)
        return newly_lost

    def _lose(self, p: Placed) -> None:
        names = ", ".join(s.name for s in p.slot.gpu.services)
        p.state = "lost"
        p.error = p.lost_because = f"node {p.slot.node.short} left the cluster"
        log.warning("%s: %s; its services (%s) are unavailable there%s", p.slot.label,
                    p.error, names, "; re-placing it" if p.slot.gpu.restart == "anywhere"
                    else " (restart: never)")
        self._publish(p, "lost", p.error)

    def _replace(self, p: Placed, nodes: list[Node]) -> None:
        """Find room for a lost entry elsewhere and start it there; on failure it
        stays lost and is tried again next round (the reason logged once)."""
        running = [q.slot for q in self.placed() if q.state == "running"]
        try:
            (slot,) = placement.plan([(p.slot.index, p.slot.gpu)], nodes,
                                     honour_pins=False, taken=running)
            group = placement.reserve([slot], f"colocate/{self.name}/{p.entry}"
                                              f"#{p.replacements + 1}", self.placement_timeout_s)
        except PlacementError as exc:
            why = f"{p.lost_because}; not re-placed yet: {exc}"
            if why != p.error:          # say it once, not every round
                log.warning("cannot re-place %s yet: %s", p.slot.label, exc)
                p.error = why
                self._publish(p, "unplaceable", str(exc))
            return
        self._groups.append(group)
        old = p.actor
        p.slot, p.group, p.bundle, p.state = slot, group, 0, "replacing"
        self._publish(p, "replacing", f"on node {slot.node.short}")
        try:
            ray.kill(old, no_restart=True)     # frees its name if Ray has not yet
        except Exception:
            pass
        try:
            p.actor = self._spawn(p, replacement=p.replacements + 1)
            ray.get(p.actor.start.remote(), timeout=self._ready_timeout_s)
            ray.get(p.actor.wait_ready.remote(self._ready_timeout_s),
                    timeout=self._ready_timeout_s + 10)
        except Exception as exc:
            p.state = "lost"
            p.error = f"{p.lost_because}; re-placement on {slot.node.short} failed: {exc}"
            log.warning("%s: %s", p.slot.label, p.error)
            self._publish(p, "unplaceable", p.error)
            placement.release(group)
            return
        p.state, p.error = "running", ""
        p.replacements += 1
        log.warning("%s re-placed on node %s (re-placement %d)", p.slot.label,
                    slot.node.short, p.replacements)
        self._publish(p, "replaced", f"on node {slot.node.short}")

    # ---- stopping ----------------------------------------------------------------
    def stop_watch(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def release(self) -> None:
        """Kill every supervisor, free the bundles, drop the record."""
        self.stop_watch()
        for p in self.placed():
            if p.actor is not None:
                try:
                    ray.kill(p.actor, no_restart=True)
                except Exception:      # already gone with its node
                    pass
        for group in self._groups:
            placement.release(group)
        self._groups = []
        if self.record is not None:
            ray.kill(self.record, no_restart=True)
            self.record = None


def _on_node(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)
