"""gRPC targets for a replicated service: several "host:port" as one target string,
which `colocate serve` prints and colocate's Client (and any gRPC client with the
round_robin policy) dials."""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence


def address_list_target(addresses: Sequence[str]) -> str:
    """Several "host:port" as one gRPC target: "ipv4:a:p,b:q" when every host is an
    IPv4 literal, "ipv6:[a]:p,..." when every one is IPv6; otherwise plain
    comma-joined, which only colocate's Client understands."""
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in addresses]
    versions = set()
    for host in hosts:
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            return ",".join(addresses)
    if versions == {4}:
        return "ipv4:" + ",".join(addresses)
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{a.rsplit(':', 1)[1]}"
                                  for h, a in zip(hosts, addresses))
    return ",".join(addresses)
