"""`colocate status`: every deployment on a Ray cluster, read from its named actors.

Each deployment's record (registry.py) lists its device entries with where they
were placed and whether their node is still there; each running entry's
supervisor then reports its services (state, restarts, load, KV use) and its
device's ledger. An entry whose node is gone shows as the record last saw it.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from colocate.cluster.registry import (NAMESPACE, ClusterUnreachable, deployment_names,
                                       on_cluster, record_name)
from colocate.sizes import format_size

ASK_TIMEOUT_S = 10.0


def cluster_status(timeout: float = ASK_TIMEOUT_S) -> list[dict]:
    """Per deployment: its record's snapshot, each entry row extended with `status`
    (its supervisor's status(), or None if it cannot be asked). Needs a connected Ray."""
    out = []
    for name in deployment_names():
        try:
            record = ray.get_actor(record_name(name), namespace=NAMESPACE)
            snapshot = ray.get(record.snapshot.remote(), timeout=timeout)
        except (ValueError, RayActorError, GetTimeoutError):   # stopped meanwhile
            continue
        asked = {}
        for entry in snapshot["entries"]:
            if entry["state"] == "running":
                try:
                    actor = ray.get_actor(entry["supervisor"], namespace=NAMESPACE)
                    asked[entry["entry"]] = actor.status.remote(True)
                except ValueError:
                    pass
        for entry in snapshot["entries"]:
            entry["status"] = None
            if entry["entry"] in asked:
                try:
                    entry["status"] = ray.get(asked[entry["entry"]], timeout=timeout)
                except (RayActorError, GetTimeoutError) as exc:
                    entry["error"] = entry["error"] or f"supervisor does not answer: {exc}"
        out.append(snapshot)
    return out


def format_status(deployments: list[dict]) -> str:
    if not deployments:
        return "no colocate deployment on this cluster\n"
    lines = []
    for dep in deployments:
        lines.append(f"deployment {dep['deployment']} ({dep['source']}): "
                     f"{len(dep['entries'])} device entries, "
                     f"{dep['replacements']} re-placement(s)")
        addresses: dict[str, list[str]] = {}
        for entry in sorted(dep["entries"], key=lambda e: e["index"]):
            lines.extend(_entry_lines(entry, addresses))
        for service, targets in addresses.items():
            if len(targets) > 1:
                lines.append(f"  replicated {service}: {','.join(targets)}")
        for event in dep["events"][-8:]:
            when = time.strftime("%H:%M:%S", time.localtime(event["time"]))
            lines.append(f"  {when} {event['entry']}: {event['event']} {event['detail']}")
    return "\n".join(lines) + "\n"


def _entry_lines(entry: dict, addresses: dict[str, list[str]]) -> list[str]:
    status = entry["status"]
    state = entry["state"]                 # running | lost | replacing
    if state == "running" and status is None:
        state = "unreachable"
    lines = [f"  entry {entry['entry']}: {entry['device']} on node {entry['node_id'][:8]} "
             f"({entry['node_ip']}), {state}"
             + (f": {entry['error']}" if entry["error"] else "")
             + (f"; metrics {status['metrics_url']}" if status else "")]
    rows = status["services"] if status else [
        dict(name=n, port=p, host=entry["host"], state=state, restarts=0, stats=None)
        for n, p in entry["services"]]
    for s in rows:
        host = entry["node_ip"] if s["host"] in ("0.0.0.0", "::") else s["host"]
        target = f"{host}:{s['port']}"
        addresses.setdefault(s["name"], []).append(target)
        load = ""
        if s.get("stats") is not None:
            st = s["stats"]
            load = (f", {st.num_running} running, {st.num_waiting} waiting, "
                    f"KV {st.kv_blocks_used}/{st.kv_blocks_total} blocks"
                    + _lending(st) + (", sleeping" if st.sleeping else ""))
        health = s["state"] if status else f"{state} (unhealthy)"
        lines.append(f"    service {s['name']} at {target}: {health}, "
                     f"{s.get('restarts', 0)} restart(s){load}")
    if status:
        capacity = status["capacity_bytes"]
        lines.append(f"    ledger: {format_size(status['reserved_bytes'])} reserved of "
                     f"{format_size(capacity) if capacity else '?'}; weights "
                     f"{format_size(status['weight_store_bytes'])} in "
                     f"{status['weight_copies']} copy(ies)")
        for item, nbytes, service in status["ledger"]:
            lines.append(f"      {format_size(nbytes):>12}  {item}")
    return lines


def _lending(stats) -> str:
    """A lending's figures (fused or isolated) for one service's row; nothing when none is out."""
    parts = [f"{n} {what}" for n, what in ((stats.kv_blocks_lent, "lent"),
                                           (stats.kv_blocks_borrowed, "borrowed")) if n]
    return f" ({', '.join(parts)})" if parts else ""


def metrics_urls(deployments: list[dict]) -> list[str]:
    """Every running entry's /metrics URL, a wildcard host replaced by its node's IP
    (as Deployment.metrics_urls does), for `colocate top --address`."""
    urls = []
    for snapshot in deployments:
        for entry in snapshot["entries"]:
            status = entry.get("status")
            if status and status.get("metrics_url"):
                url = status["metrics_url"]
                for wildcard in ("0.0.0.0", "[::]"):
                    url = url.replace(f"//{wildcard}:", f"//{status['node_ip']}:")
                urls.append(url)
    return urls


def run_status(address: str | None, out: TextIO = sys.stdout,
               timeout: float = ASK_TIMEOUT_S) -> int:
    """Join the cluster at `address` (default auto), print its deployments, leave."""
    try:
        with on_cluster(address, "colocate status"):
            out.write(format_status(cluster_status(timeout)))
    except ClusterUnreachable as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0
