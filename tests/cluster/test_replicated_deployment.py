"""One YAML on a two-node Ray cluster: a service replicated on both nodes, reached
through one target; an unplaceable deployment refused before anything starts; a
node lost, reported, and its entry re-placed once a node with room joins.

The tests run in file order: the last two take a node away and add another.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest
import ray
import torch

from colocate.client import Client
from colocate.sampling_params import SamplingParams
from colocate.cluster.deploy import Deployment
from colocate.cluster.placement import PlacementError
from colocate.cluster.registry import NAMESPACE, deployment_names, supervisor_name
from tests.cluster.helpers import (KV_TOKENS, SERVICE, entry, free_ports,
                                   replicated_deployment, token_of)

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Once upon a time", "In a hole in the ground",
           "It was a bright cold day", [1, 50, 60, 70, 80], "Call me"]
SAMPLING = dict(max_tokens=8, temperature=0.0)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def finished_requests(deployment, entry_name: str) -> int:
    """Requests the replica on `entry_name` has finished, by its engine's counters."""
    service = ray.get(deployment.supervisor(entry_name).service_actor.remote(SERVICE))
    return sum(ray.get(service.metrics.remote()).stats.finished.values())


def rows(deployment) -> dict[str, dict]:
    return {row["entry"]: row for row in deployment.status(with_stats=False)}


# ---- refused before anything starts ------------------------------------------------

@pytest.mark.parametrize("entries, problem", [
    (lambda p: [entry("cpu-a", "a", p[0], first=True), entry("cpu-z", "z", p[1])],
     r"gpus\[1\] \(cpu-z\): no live node matches node: zone=z"),
    (lambda p: [entry("cpu-a", "a", p[0], first=True),
                entry("gpu-b", "b", p[1], device="cuda:0")],
     r"gpus\[1\] \(gpu-b\): the node\(s\) matching node: zone=b declare no GPU"),
    (lambda p: [entry("cpu-a", "a", p[0], first=True), entry("cpu-a2", "a", p[1])],
     r"gpus\[1\] \(cpu-a2\): every colocate_cpu_device on the node\(s\) matching "
     r"node: zone=a is taken"),
    # Two nodes, one host: the YAML allows one port on both pins, the host does not.
    (lambda p: [entry("cpu-a", "a", p[0], first=True), entry("cpu-b", "b", p[0])],
     r"gpus\[1\] \(cpu-b\) service chat: port \d+ on \S+ is already used"),
], ids=["no-such-node", "no-gpu", "node-full", "port-on-one-host"])
def test_an_unplaceable_deployment_names_the_entry_and_starts_nothing(
        ray_cluster, tmp_path, tiny_model_dir, entries, problem):
    config = replicated_deployment(tmp_path, str(tiny_model_dir), entries(free_ports(2)),
                                   name="unplaceable")
    with pytest.raises(PlacementError, match=problem):
        Deployment(config, torch_threads=1, ledger_dir=str(tmp_path / "ledger"))
    assert "unplaceable" not in deployment_names()
    with pytest.raises(ValueError):       # no supervisor was ever created
        ray.get_actor(supervisor_name("unplaceable", "cpu-a"), namespace=NAMESPACE)


# ---- one service, a replica per node ---------------------------------------------------

@pytest.fixture(scope="module")
def deployment(ray_cluster, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-nodes")
    ports = free_ports(2)
    config = replicated_deployment(tmp, str(tiny_model_dir), [
        entry("cpu-a", "a", ports[0], first=True),
        entry("cpu-b", "b", ports[1], restart="anywhere")], name="two-nodes")
    with Deployment(config, torch_threads=1, health_interval_s=0.5,
                    ledger_dir=str(tmp / "ledger")) as dep:
        dep.wait_ready(timeout=180)
        yield dep


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """The offline engine's greedy tokens for every prompt (one torch thread, as
    the services run)."""
    from colocate import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(model=str(tiny_model_dir), kv_cache_tokens=KV_TOKENS, max_model_len=256)
        return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**SAMPLING))]
    finally:
        torch.set_num_threads(threads)


def test_each_supervisor_runs_on_its_node(deployment, ray_cluster):
    for name, zone in (("cpu-a", "a"), ("cpu-b", "b")):
        actor = ray.get_actor(supervisor_name("two-nodes", name), namespace=NAMESPACE)
        node = ray.get(actor.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()))
        assert node == ray_cluster.node_id(zone)
        assert rows(deployment)[name]["node_id"] == node


def test_one_target_reaches_both_replicas_with_the_offline_outputs(deployment, expected):
    target = deployment.targets()[SERVICE]
    assert target.startswith("ipv4:") and target.count(",") == 1
    before = {e: finished_requests(deployment, e) for e in ("cpu-a", "cpu-b")}
    with Client(target, token_of(SERVICE), timeout=120) as client:
        got = [client.complete(prompt, **SAMPLING).token_ids for prompt in PROMPTS]
    assert got == expected
    served = {e: finished_requests(deployment, e) - before[e] for e in before}
    assert sum(served.values()) == len(PROMPTS)
    assert all(n > 0 for n in served.values()), served      # round-robin reached both


# ---- losing a node --------------------------------------------------------------------

def test_a_lost_node_is_reported_and_the_other_replica_keeps_serving(
        deployment, ray_cluster, expected):
    ray_cluster.remove("b")
    wait_for(lambda: rows(deployment)["cpu-b"]["state"] == "lost", 60, "cpu-b lost")
    lost = rows(deployment)["cpu-b"]
    assert [s["state"] for s in lost["services"]] == ["lost"]

    # The same one target still answers, from the replica that is left.
    with Client(deployment.targets()[SERVICE], token_of(SERVICE), timeout=60) as client:
        assert client.complete(PROMPTS[0], **SAMPLING).token_ids == expected[0]
    assert rows(deployment)["cpu-a"]["services"][0]["state"] == "running"

    # `restart: anywhere`, but the only node left has no colocate_cpu_device free.
    wait_for(lambda: any(e["event"] == "unplaceable" for e in deployment.fleet.events),
             30, "the failed re-placement to be recorded")

    # Another process sees the same through the named actors.
    out = subprocess.run([sys.executable, "-m", "colocate.cli", "status", "--address",
                          ray_cluster.address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "deployment two-nodes" in out.stdout
    assert "entry cpu-a: cpu on node" in out.stdout and ", running" in out.stdout
    assert "entry cpu-b: cpu on node" in out.stdout and ", lost:" in out.stdout
    assert "service chat at" in out.stdout and "lost (unhealthy)" in out.stdout
    assert "ledger:" in out.stdout


def test_a_lost_entry_that_may_move_is_replaced_on_a_new_node(deployment, ray_cluster,
                                                               expected):
    ray_cluster.add("c")
    wait_for(lambda: rows(deployment)["cpu-b"]["state"] == "running", 120,
             "cpu-b re-placed on the new node")
    assert rows(deployment)["cpu-b"]["node_id"] == ray_cluster.node_id("c")
    assert deployment.fleet.replacements == 1
    assert [e["event"] for e in deployment.fleet.events][-2:] == ["replacing", "replaced"]
    # ... and the re-placed entry's own /metrics says so.
    with urllib.request.urlopen(deployment.metrics_urls()["cpu-b"], timeout=30) as resp:
        scraped = resp.read().decode()
    assert any(line.startswith("colocate_device_replacements_total{")
               and line.rstrip().endswith(" 1.0") for line in scraped.splitlines())
    before = finished_requests(deployment, "cpu-b")
    with Client(deployment.targets()[SERVICE], token_of(SERVICE), timeout=120) as client:
        got = [client.complete(p, **SAMPLING).token_ids for p in PROMPTS[:4]]
    assert got == expected[:4]
    assert finished_requests(deployment, "cpu-b") > before
