"""The deployment's record on the cluster: a small named actor any process can read.

`colocate status --address ...` runs in another process than the `colocate serve`
that placed the deployment, and a supervisor whose node died can no longer speak
for itself; so the driver keeps, in a named actor on its own node, every entry's
placement and state (running, lost, replacing), the re-placements so far and the
latest events. Actor names, all in the Ray namespace `colocate`:

    colocate/<deployment>                   this record
    colocate/<deployment>/<device entry>    that entry's GPUSupervisor

The record lives and dies with the driver, like the supervisors it describes.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterator

import ray

NAMESPACE = "colocate"
EVENTS_KEPT = 200


def record_name(deployment: str) -> str:
    return f"colocate/{deployment}"


def supervisor_name(deployment: str, entry: str) -> str:
    return f"colocate/{deployment}/{entry}"


class ClusterUnreachable(RuntimeError):
    """The Ray cluster a command was pointed at cannot be joined; the message says so."""


@contextlib.contextmanager
def on_cluster(address: str | None, command: str) -> Iterator[None]:
    """Join the cluster at `address` (default auto) unless already connected, and
    leave it afterwards; ClusterUnreachable naming `command` if it cannot be joined."""
    joined = not ray.is_initialized()
    if joined:
        try:
            ray.init(address=address or "auto", logging_level=logging.WARNING,
                     log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterUnreachable(f"{command}: cannot join the Ray cluster at "
                                     f"{address or 'auto'}: {exc}") from None
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def deployment_names() -> list[str]:
    """The deployments recorded on the cluster this process is connected to."""
    names = (a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE)
    return sorted(n.split("/", 1)[1] for n in names if n.count("/") == 1)


class Record:
    def __init__(self, deployment: str, source: str) -> None:
        self.deployment = deployment
        self.source = source                 # the YAML file it was read from
        self.entries: dict[str, dict] = {}   # entry name -> its row (see Fleet.row)
        self.replacements = 0
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)

    def set_entry(self, row: dict) -> None:
        self.entries[row["entry"]] = row

    def event(self, entry: str, what: str, detail: str = "") -> None:
        if what == "replaced":
            self.replacements += 1
        self.events.append(dict(time=time.time(), entry=entry, event=what, detail=detail))

    def snapshot(self) -> dict:
        return dict(deployment=self.deployment, source=self.source,
                    entries=list(self.entries.values()), replacements=self.replacements,
                    events=list(self.events))


DeploymentRecord = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)(Record)
