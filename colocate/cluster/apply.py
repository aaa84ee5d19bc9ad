"""`colocate apply NEW.yaml`: a live change to a running deployment, every entry or none.

The driver's half (the supervisors' is live_change.py): every device entry of the
new YAML goes to the running supervisor of that entry, first as a dry run, so that
all of them check their new plan before any changes; only when every entry fits is
the change made, entry by entry. A refusal (ChangeRefused, or the plan's message)
leaves the deployment as it was. Entries cannot be added or removed live.

`colocate serve` applies its own YAML again on SIGHUP (deploy.py); `colocate apply
--address` finds the deployment's supervisors on the cluster by their names
(registry.py).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TextIO

import ray
from ray.exceptions import RayActorError, RayTaskError

from colocate.config import DeploymentConfig, DeviceSpec, load_config
from colocate.cluster.live_change import ChangeRefused
from colocate.cluster.registry import (NAMESPACE, ClusterUnreachable, deployment_names,
                                       on_cluster, record_name)
from colocate.cluster.supervisor import SHUTDOWN_GRACE_S, DeploymentError


def tenant_tokens(gpu: DeviceSpec) -> dict[str, dict[str, str]]:
    """service name -> {bearer token: tenant name}, as the services authenticate."""
    return {s.name: {t.token: t.name for t in s.tenants} for s in gpu.services}


def unwrap(call: Callable):
    """Run a ray.get, turning a supervisor's DeploymentError back into a plain one
    (its message, without the remote traceback Ray wraps it in)."""
    try:
        return call()
    except RayTaskError as exc:
        if isinstance(exc.cause, DeploymentError):
            raise DeploymentError(str(exc.cause)) from None
        raise
    except RayActorError as exc:
        raise DeploymentError(f"a supervisor died: {exc}") from None


def apply_to(supervisors: Mapping[str, object], config: DeploymentConfig,
             grace: float = SHUTDOWN_GRACE_S) -> list[str]:
    """Change the running entries (entry name -> supervisor) to `config`; one summary
    line per entry. Raises DeploymentError, having changed nothing, if any entry
    refuses."""
    entries = {g.entry_name: g for g in config.gpus}
    if set(entries) != set(supervisors):
        raise ChangeRefused(
            "device entries cannot be added or removed live (running: "
            f"{', '.join(sorted(supervisors))}; new: {', '.join(sorted(entries))}); "
            "restart the deployment")

    def ask(dry_run: bool) -> list[str]:
        refs = [sup.apply_change.remote(entries[name], config, tenant_tokens(entries[name]),
                                        dry_run=dry_run, grace=grace)
                for name, sup in supervisors.items()]
        return unwrap(lambda: ray.get(refs))

    ask(dry_run=True)                # every entry's plan first: all fit, or nothing changes
    return ask(dry_run=False)


def deployment_supervisors(name: str | None) -> tuple[str, dict[str, object]]:
    """The deployment `name` (or the only one) on the connected cluster, and its
    running entries' supervisors."""
    names = deployment_names()
    if name is None:
        if len(names) != 1:
            raise DeploymentError(f"{len(names)} deployments on this cluster "
                                  f"({', '.join(names) or 'none'}): name one with "
                                  "--deployment or the YAML's `name:`")
        name = names[0]
    if name not in names:
        raise DeploymentError(f"no deployment {name!r} on this cluster "
                              f"(running: {', '.join(names) or 'none'})")
    record = ray.get_actor(record_name(name), namespace=NAMESPACE)
    snapshot = ray.get(record.snapshot.remote(), timeout=30)
    return name, {e["entry"]: ray.get_actor(e["supervisor"], namespace=NAMESPACE)
                  for e in snapshot["entries"] if e["state"] == "running"}


def run_apply(path: str, address: str | None, deployment: str | None = None,
              out: TextIO = sys.stdout, grace: float = SHUTDOWN_GRACE_S) -> int:
    """The CLI: 0 applied, 1 refused (nothing changed), 2 a bad file or no cluster."""
    try:
        config = load_config(path)
    except ValueError as exc:        # ConfigError included
        print(f"colocate apply: {exc}", file=sys.stderr)
        return 2
    try:
        with on_cluster(address, "colocate apply"):
            name, supervisors = deployment_supervisors(deployment or config.name)
            for line in apply_to(supervisors, config, grace):
                print(f"{name}: {line}", file=out)
    except ClusterUnreachable as exc:
        print(exc, file=sys.stderr)
        return 2
    except DeploymentError as exc:
        print(f"colocate apply: refused, nothing changed: {exc}", file=sys.stderr)
        return 1
    return 0
