"""The rules of a multi-device YAML and the placement plan, without Ray: replicas,
ports across pins, node matching, the resource each entry asks for."""
from __future__ import annotations

import pytest

from colocate.client import channel_target
from colocate.config_values import ConfigError
from colocate.cluster.placement import (CPU_DEVICE_RESOURCE, FALLBACK_BUNDLE, Node,
                                        PlacementError, plan)
from tests.cluster.helpers import entry, replicated_deployment


def load(tmp_path, *entries):
    return replicated_deployment(tmp_path, "preset:tiny", list(entries), name="t")


def test_a_name_under_several_entries_is_one_replicated_service(tmp_path):
    config = load(tmp_path, entry("a", "a", 50051, first=True),
                  entry("b", "b", 50051))
    copies = config.replicas()["chat"]
    assert [(gpu.entry_name, gpu.node, s.port) for gpu, s in copies] == [
        ("a", "zone=a", 50051), ("b", "zone=b", 50051)]


@pytest.mark.parametrize("second, key, problem", [
    # Unpinned entries may share a host, so they may not share a port.
    (entry("b", None, 50051), "gpus[1].services[0].port", "duplicate port 50051"),
    (entry("b", "a", 50051), "gpus[1].services[0].port", "duplicate port 50051"),
    (entry("a", "b", 50052), "gpus[1].name", "a is already listed at gpus[0]"),
    (entry("b", "b", 50052).replace("port: 50052", "port: 50052, max_num_seqs: 4"),
     "gpus[1].services[0].max_num_seqs", "replicas may differ only in port"),
])
def test_replica_rules_name_the_key(tmp_path, second, key, problem):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, entry("a", "a", 50051, first=True), second)
    assert f": {key}: " in str(err.value) and problem in str(err.value), str(err.value)


def test_one_entry_cannot_list_a_service_twice(tmp_path):
    doubled = entry("a", None, 50051, first=True) + "\n      - {<<: *chat, port: 50052}"
    with pytest.raises(ConfigError, match=r"services\[1\].name: duplicate service name"):
        load(tmp_path, doubled)


def node(node_id: str, ip: str, zone: str, cpu_devices: float = 0, gpus: float = 0) -> Node:
    total = {"CPU": 2.0, CPU_DEVICE_RESOURCE: cpu_devices, "GPU": gpus}
    total = {k: v for k, v in total.items() if v}
    return Node(node_id, ip, {"zone": zone}, total, dict(total))


def test_the_plan_puts_pins_first_and_spreads_the_rest(tmp_path):
    config = load(tmp_path, entry("free", None, 50051, first=True),
                  entry("pinned", "a", 50052))
    nodes = [node("aa" * 28, "10.0.0.1", "a", cpu_devices=1),
             node("bb" * 28, "10.0.0.2", "b", cpu_devices=1)]
    slots = plan(list(enumerate(config.gpus)), nodes)
    assert [(s.gpu.entry_name, s.node.ip) for s in slots] == [("free", "10.0.0.2"),
                                                              ("pinned", "10.0.0.1")]
    assert slots[0].bundle == {CPU_DEVICE_RESOURCE: 1}


@pytest.mark.parametrize("pin", ["bbbbbbbb", "10.0.0.2", "zone=b"])
def test_a_pin_is_a_node_id_prefix_an_ip_or_a_label(tmp_path, pin):
    config = load(tmp_path, entry("x", None, 50051, first=True).replace(
        "name: x", f"name: x\n    node: \"{pin}\""))
    nodes = [node("aa" * 28, "10.0.0.1", "a"), node("bb" * 28, "10.0.0.2", "b")]
    (slot,) = plan(list(enumerate(config.gpus)), nodes)
    assert slot.node.ip == "10.0.0.2"
    assert slot.bundle == FALLBACK_BUNDLE     # no node offers colocate_cpu_device


def test_a_node_without_the_resource_is_named(tmp_path):
    config = load(tmp_path, entry("g", "a", 50051, first=True, device="cuda:0"))
    with pytest.raises(PlacementError, match=r"gpus\[0\] \(g\): .* declare no GPU"):
        plan(list(enumerate(config.gpus)), [node("aa" * 28, "10.0.0.1", "a", 1)])


def test_a_replica_list_is_balanced_round_robin():
    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", ())
    target, options = channel_target("127.0.0.1:50051,127.0.0.1:50061")
    assert target == "ipv4:127.0.0.1:50051,127.0.0.1:50061"
    assert ("grpc.lb_policy_name", "round_robin") in options
    with pytest.raises(ValueError, match="must give IP addresses"):
        channel_target("host-a:50051,host-b:50051")
