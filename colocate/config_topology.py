"""What may repeat across the device entries of a deployment file, and what may not.

A deployment may span a Ray cluster, so a few things that must be unique on one
machine may repeat across machines:

- a port (a service's or a metrics port) may be reused only by device entries that
  pin different `node`s: entries without a pin may land on one host, and so may two
  entries pinned to the same node. (Two pins that name one host in different ways,
  an IP and a node id, are caught again at placement, where both are resolved.)
- a service name listed under several device entries is one service with one
  replica per entry. The copies must agree on everything but the port, since a
  tenant cannot tell which replica answers; one entry may not list a name twice.
- each entry needs a distinct name: its `name`, else `device` (and `@node` when
  pinned). Two `cpu` entries must therefore pin different nodes or be named.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from colocate.config_values import ConfigError


@dataclasses.dataclass(frozen=True)
class _Claim:
    key: str          # the key path that took it, for messages
    entry: int        # the device entry's index
    node: str | None  # that entry's `node` pin


class Topology:
    """Collects the entries' ports, service names and entry names while the reader
    walks the file; each claim raises at once, naming the key that clashes."""

    def __init__(self, error: Callable[[str, str], ConfigError]) -> None:
        self._error = error
        self._ports: dict[int, list[_Claim]] = {}
        self._services: dict[str, tuple[object, _Claim]] = {}
        self._entries: dict[str, str] = {}          # entry name -> key path
        self.entry = -1
        self.node: str | None = None

    def begin_entry(self, index: int, node: str | None) -> None:
        """Every claim until the next call belongs to device entry `index`."""
        self.entry, self.node = index, node

    def claim_entry(self, name: str, entry_key: str, blame: str, hint: str = "") -> None:
        """entry_key: `gpus[i]`; blame: the key a clash is reported at."""
        if name in self._entries:
            raise self._error(blame, f"{name} is already listed at {self._entries[name]}{hint}")
        self._entries[name] = entry_key

    def claim_port(self, port: int, key: str) -> None:
        mine = _Claim(key, self.entry, self.node)
        for other in self._ports.get(port, []):
            if _may_share_host(mine, other):
                raise self._error(key, f"duplicate port {port}, already used by {other.key}")
        self._ports.setdefault(port, []).append(mine)

    def claim_service(self, service, key: str) -> None:
        """service: a ServiceSpec read at `key` (its `.name` key is `key.name`)."""
        mine = _Claim(key, self.entry, self.node)
        if service.name not in self._services:
            self._services[service.name] = (service, mine)
            return
        first, claim = self._services[service.name]
        if claim.entry == self.entry:
            raise self._error(f"{key}.name", f"duplicate service name {service.name!r}, "
                                             f"already used by {claim.key}")
        for field in dataclasses.fields(service):
            if field.name not in ("port", "http_port") and field.compare and \
                    getattr(service, field.name) != getattr(first, field.name):
                raise self._error(f"{key}.{field.name}",
                                  f"replica of {service.name!r} differs from {claim.key}; "
                                  f"replicas may differ only in port and http_port")


def _may_share_host(a: _Claim, b: _Claim) -> bool:
    return a.entry == b.entry or a.node is None or b.node is None or a.node == b.node
