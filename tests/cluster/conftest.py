"""A Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster).

A process holds one Ray connection at a time. Other test folders share one local
Ray for the session (tests/deployment/conftest.py); so this fixture shuts that
one down if it is up, connects to its own cluster for this folder's module, and
afterwards starts a local Ray again for whatever tests come next.

Each node declares one `colocate_cpu_device` (room for one CPU device entry) and
a label `zone=<letter>`, by which the deployments pin their entries. (Ray's own
processes use the host's address: pinning them to 127.0.0.1 leaves the driver
unable to reach the GCS; the services still bind 127.0.0.1.) Cluster() writes its address to Ray's "current cluster" file,
which a plain ray.init() elsewhere on the host would follow; the previous content
is put back at once, so no other process wanders into this cluster.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from colocate.cluster.placement import CPU_DEVICE_RESOURCE


def node_args(zone: str) -> dict:
    return dict(num_cpus=1, labels={"zone": zone}, resources={CPU_DEVICE_RESOURCE: 1})


class LocalCluster:
    """The cluster and its nodes by zone."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        address_file = Path(ray._common.utils.get_ray_address_file(None))
        before = address_file.read_text() if address_file.exists() else None
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            node_args("a"), include_dashboard=False))
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
        self.nodes = {"a": self.cluster.head_node}
        self.add("b")

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, zone: str):
        self.nodes[zone] = self.cluster.add_node(**node_args(zone))
        return self.nodes[zone]

    def remove(self, zone: str) -> None:
        self.cluster.remove_node(self.nodes.pop(zone))

    def node_id(self, zone: str) -> str:
        return self.nodes[zone].node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    from colocate.cluster.deploy import init_ray

    had_local_ray = ray.is_initialized()
    if had_local_ray:
        ray.shutdown()
    cluster = LocalCluster()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local_ray:
            init_ray(None)
