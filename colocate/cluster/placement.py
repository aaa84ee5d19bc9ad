"""Placement: which Ray node each device entry's supervisor runs on, reserved at once.

Every entry needs one unit of a Ray resource on its node:

- a CUDA entry one GPU (`num_gpus=1`), so Ray hands its supervisor one device and
  sets CUDA_VISIBLE_DEVICES;
- a CPU entry one `colocate_cpu_device`, the custom resource by which a node offers
  its CPU to colocate: `ray start --resources='{"colocate_cpu_device": 1}'` lets one
  CPU entry land there. A local Ray started by colocate declares many, since every
  local deployment shares the one CPU anyway (the shared ledger keeps their memory
  apart). On a cluster where no node declares it at all, CPU entries fall back to a
  token CPU fraction and go wherever their pin, or the plan, puts them.

An entry may pin a node (`node:` a node id or a unique prefix of one, an IP, or a
label `key=value`); an IP or a label may match several nodes, of which the plan
picks one. The plan is made here, entry by entry (pinned ones first, each on the
matching node with the most of its resource free), so that a refusal can name the
entry and say why. It is then reserved as ONE placement group whose bundles are
each held to their node by a label selector: Ray grants all of it or none of it,
and never moves a bundle behind our back when a node dies (re-placing is the
deployer's decision, see node_watch.py).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from colocate.config import DeviceSpec
from colocate.cluster.launch import DeploymentError

CPU_DEVICE_RESOURCE = "colocate_cpu_device"
LOCAL_CPU_DEVICE_SLOTS = 64          # declared by a local Ray: see the module docstring
NODE_ID_LABEL = "ray.io/node-id"     # a label Ray gives every node
# A bundle cannot be empty; this much CPU is nothing, and is there on any node.
FALLBACK_BUNDLE = {"CPU": 0.001}
PLACEMENT_TIMEOUT_S = 30.0
_NODE_ID_PREFIX = re.compile(r"^[0-9a-fA-F]{8,}$")


class PlacementError(DeploymentError):
    """A deployment that cannot be placed; the message names the entry."""


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    labels: dict
    total: dict          # resource -> amount the node declares
    available: dict      # resource -> amount free now

    @property
    def short(self) -> str:
        return f"{self.node_id[:8]} ({self.ip})"


@dataclass(frozen=True)
class Slot:
    """One entry's place: the node, the bundle reserved there, and the resources its
    supervisor actor takes out of that bundle."""
    index: int                 # in config.gpus
    gpu: DeviceSpec
    node: Node
    bundle: dict
    actor_resources: dict      # num_gpus / resources options for the actor

    @property
    def label(self) -> str:
        return entry_label(self.index, self.gpu)


def entry_label(index: int, gpu: DeviceSpec) -> str:
    return f"gpus[{index}] ({gpu.entry_name})"


def alive_nodes() -> list[Node]:
    """The cluster's live nodes and what each has free now."""
    try:     # private but long-lived; without it, plan against totals
        free = ray._private.state.available_resources_per_node()
    except Exception:
        free = {}
    return [Node(n["NodeID"], n["NodeManagerAddress"], dict(n.get("Labels") or {}),
                 dict(n["Resources"]), dict(free.get(n["NodeID"], n["Resources"])))
            for n in ray.nodes() if n["Alive"]]


def pin_matches(pin: str, node: Node) -> bool:
    if "=" in pin:
        key, value = pin.split("=", 1)
        return node.labels.get(key.strip()) == value.strip()
    if _NODE_ID_PREFIX.match(pin) and node.node_id.startswith(pin.lower()):
        return True
    return node.ip == pin


def demand(gpu: DeviceSpec, nodes: Sequence[Node]) -> tuple[str, dict, dict]:
    """(resource, bundle, actor options) for one entry on this cluster."""
    if gpu.is_cuda:
        return "GPU", {"GPU": 1}, {"num_gpus": 1}
    if any(n.total.get(CPU_DEVICE_RESOURCE, 0) > 0 for n in nodes):
        return (CPU_DEVICE_RESOURCE, {CPU_DEVICE_RESOURCE: 1},
                {"resources": {CPU_DEVICE_RESOURCE: 1}})
    return "CPU", dict(FALLBACK_BUNDLE), {}


def plan(entries: Sequence[tuple[int, DeviceSpec]], nodes: Sequence[Node], *,
         honour_pins: bool = True, taken: Iterable[Slot] = ()) -> list[Slot]:
    """A node for every entry, or PlacementError naming the first that has none.

    honour_pins=False: ignore `node:` (re-placing an entry whose node is gone).
    taken: slots already running, whose ports the new ones must not reuse."""
    free = {n.node_id: dict(n.available) for n in nodes}
    slots = []
    # Pinned entries first: they have no choice, the others do.
    for index, gpu in sorted(entries, key=lambda e: (honour_pins and e[1].node is None, e[0])):
        label = entry_label(index, gpu)
        resource, bundle, options = demand(gpu, nodes)
        need = bundle[resource]
        pin = gpu.node if honour_pins else None
        where = f"the node(s) matching node: {pin}" if pin else "any node"
        candidates = [n for n in nodes if pin is None or pin_matches(pin, n)]
        if not candidates:
            raise PlacementError(f"{label}: no live node matches node: {pin} (live nodes: "
                                 f"{describe(nodes)})")
        having = [n for n in candidates if n.total.get(resource, 0) >= need]
        if not having:
            raise PlacementError(f"{label}: {where} declare no {resource} "
                                 f"({describe(candidates, resource)})")
        room = [n for n in having if free[n.node_id].get(resource, 0) >= need]
        if not room:
            raise PlacementError(f"{label}: every {resource} on {where} is taken "
                                 f"({describe(having, resource)}, counting this deployment)")
        node = max(room, key=lambda n: free[n.node_id].get(resource, 0))
        free[node.node_id][resource] -= need
        slots.append(Slot(index, gpu, node, bundle, options))
    check_ports(slots, taken)
    return sorted(slots, key=lambda s: s.index)


def describe(nodes: Iterable[Node], resource: str | None = None) -> str:
    parts = []
    for n in nodes:
        extra = (f" {resource} {n.available.get(resource, 0):g}/{n.total.get(resource, 0):g}"
                 if resource else "")
        parts.append(f"{n.short}{extra}")
    return ", ".join(parts) or "none"


def check_ports(slots: Sequence[Slot], taken: Iterable[Slot] = ()) -> None:
    """Two entries on one host (one IP, whatever the node ids) cannot share a port.
    The YAML check cannot see this when two pins name one host differently, or when
    several Ray nodes run on one machine."""
    seen: dict[tuple[str, int], str] = {}
    for slot in [*taken, *slots]:
        ports = [(s.port, f"{slot.label} service {s.name}") for s in slot.gpu.services]
        if slot.gpu.metrics_port:
            ports.append((slot.gpu.metrics_port, f"{slot.label} metrics_port"))
        for port, who in ports:
            if (slot.node.ip, port) in seen:
                raise PlacementError(f"{who}: port {port} on {slot.node.ip} is already used "
                                     f"by {seen[slot.node.ip, port]} on the same host")
            seen[slot.node.ip, port] = who


def reserve(slots: Sequence[Slot], name: str,
            timeout: float = PLACEMENT_TIMEOUT_S) -> PlacementGroup:
    """One placement group for all the slots, each bundle held to its node; all of it
    is granted within `timeout` or none of it is kept."""
    group = placement_group([s.bundle for s in slots], strategy="PACK", name=name,
                            bundle_label_selector=[{NODE_ID_LABEL: s.node.node_id}
                                                   for s in slots])
    if group.wait(timeout):
        return group
    remove_placement_group(group)
    # Most likely another deployment took the room since the plan was made.
    raise PlacementError(f"could not reserve {', '.join(s.label for s in slots)} on "
                         f"{', '.join(s.node.short for s in slots)} within {timeout:g} s "
                         f"(the resources were taken meanwhile, or a node left)")


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        try:
            remove_placement_group(group)
        except Exception:        # already gone with its cluster
            pass


def in_bundle(group: PlacementGroup, bundle_index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index)
