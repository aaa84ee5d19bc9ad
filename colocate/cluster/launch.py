"""Launch preparation: from an admitted service to the ServiceLaunch its actor starts from.

A supervisor decides here, before any service runs, where each model's checkpoint
is (a `preset:NAME` is written on first use), how many torch threads a service
gets, and which published weight copy each service maps. Nothing here talks to
Ray, so the decisions are testable without it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from colocate import progress
from colocate.config import DeploymentConfig, DeviceSpec, ModelSpec
from colocate.engine.shared_lending import LendingCircle
from colocate.memory.cuda_devices import ORDER_ENV, PCI_ORDER
from colocate.memory.sizing import ServiceDemand
from colocate.memory.weight_store import WeightStore
from colocate.service.runtime import ServiceLaunch

PRESET_SEED = 0                 # `preset:NAME` always means this seed's checkpoint


class DeploymentError(RuntimeError):
    """A deployment that cannot start, with a message meant for the operator.

    A plain one-string exception on purpose: it crosses Ray intact, so the driver can
    print the message instead of a remote traceback."""


def preset_cache_dir() -> Path:
    """Where `preset:NAME` checkpoints are written: $COLOCATE_CACHE, else
    $XDG_CACHE_HOME/colocate, else ~/.cache/colocate; one folder per preset under
    presets/. Per user rather than per deployment so a restart does not rewrite them."""
    root = os.environ.get("COLOCATE_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "colocate"
    return Path(root) / "presets"


def preset_checkpoint(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of preset `name`, written on first use.

    Written under a temporary name and renamed into place, so a directory that exists
    is complete, and two supervisors writing at once simply leave one of the copies.
    """
    from colocate.model.tiny import write_tiny_checkpoint

    final = (cache_dir or preset_cache_dir()) / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    write_tiny_checkpoint(scratch, preset=name, seed=PRESET_SEED)
    try:
        scratch.rename(final)
    except OSError:                  # another process got there first: keep theirs
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def checkpoint_dir(model: ModelSpec, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory or GGUF file: a published preset's installed file, a tiny
    preset written on first use, or the path as given."""
    from colocate.model.published import is_published, published_path

    if model.preset and is_published(model.preset):
        return published_path(model.preset)
    return preset_checkpoint(model.preset, cache_dir) if model.preset else Path(model.path)


def default_torch_threads(num_services: int, cores: int | None = None) -> int:
    """An equal share of the cores per service, at least one."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, num_services))


def prepare_launches(gpu: DeviceSpec, config: DeploymentConfig, store: WeightStore,
                     demands: Mapping[str, ServiceDemand], *, device: str, host: str,
                     torch_threads: int, tenants: Mapping[str, Mapping[str, str]],
                     preset_dir: Path | None = None,
                     test_hooks: str | None = None) -> list[ServiceLaunch]:
    """Publish each model once (once per service when weights are not shared, so
    unshared really means separate copies) and describe every service's start.

    demands: what the arbiter admitted per service; the KV pool is sized from it.
    Raises DeploymentError naming the service whose model cannot be loaded."""
    launches = []
    # A model some service may sleep away from is kept on disk, so that its pages can
    # be given back (memory/weight_pages.py); CUDA copies are device memory either way.
    sleepers = {s.model for s in gpu.services if s.sleep_after_idle is not None}
    for service in gpu.services:
        model = config.models[service.model]
        name = model.name if gpu.share_weights else f"{model.name}@{service.name}"
        try:
            path = checkpoint_dir(model, preset_dir)
            with progress.labelled(name):     # its loading stages say which model
                store.publish(name, path, model.dtype, quantization=model.quantization,
                              quant_group_size=model.quant_group_arg,
                              on_disk=service.model in sleepers and device == "cpu")
        except (OSError, ValueError) as exc:    # missing files, bad shapes or dtype
            raise DeploymentError(f"service {service.name}: cannot load model "
                                  f"{model.name} from {model.path}: {exc}") from None
        demand = demands[service.name]
        launches.append(ServiceLaunch(
            # Each service its own share: on CUDA its own IPC lease (see cuda_ipc.py).
            spec=service, weights=store.share(name), checkpoint_dir=str(path),
            kv_tokens=demand.kv_tokens, device=device, host=host,
            torch_threads=torch_threads, weights_shared=gpu.share_weights,
            kv_budget_bytes=demand.kv_bytes, test_hooks=test_hooks,
            tenants=dict(tenants.get(service.name, {}))))
    return launches


def join_lending_circles(gpu: DeviceSpec, launches: list[ServiceLaunch], pool_dir: Path,
                         tag: str) -> list[ServiceLaunch]:
    """Isolated CPU services of one model and KV dtype, one of which lends, share one
    KV pool file (colocate/engine/shared_lending.py): each launch learns its circle,
    in YAML order. `tag` makes the files this supervisor's; it removes them at the end."""
    if gpu.batching != "isolated" or gpu.is_cuda:
        return launches
    circles: dict[tuple[str, str], list[ServiceLaunch]] = {}
    for launch in launches:
        circles.setdefault((launch.spec.model, launch.spec.kv_cache.dtype), []).append(launch)
    joined = {}
    for (model, dtype), members in circles.items():
        if not any(m.spec.kv_cache.lend for m in members):
            continue
        circle = LendingCircle(
            str(pool_dir / f"colocate-kv-{tag}-{_file_safe(model)}-{dtype}.pool"),
            tuple((m.spec.name, m.num_blocks - 1, m.spec.kv_cache.lend) for m in members))
        joined.update({m.spec.name: replace(m, kv_circle=circle) for m in members})
    return [joined.get(launch.spec.name, launch) for launch in launches]


def remove_pool_files(circle: LendingCircle) -> None:
    for path in (circle.pool_path, circle.exchange_path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def service_cuda_env(visible: str) -> dict[str, str]:
    """A zero-GPU service actor's environment on its supervisor's GPU.

    Ray leaves CUDA_VISIBLE_DEVICES alone for actors without GPUs (pyproject pins the
    Ray range where that is the default) unless RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1,
    which would blank it and hide the GPU: it is set to 0 here, whatever the driver's
    environment says. The PCI order makes the ids mean what NVML's do."""
    return {"CUDA_VISIBLE_DEVICES": visible, ORDER_ENV: PCI_ORDER,
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def process_groups(gpu: DeviceSpec, launches: list[ServiceLaunch]) -> list[list[ServiceLaunch]]:
    """The launches each service process gets: one each (isolated), or one process
    for all the services of one model (fused)."""
    if gpu.batching != "fused":
        return [[launch] for launch in launches]
    by_model: dict[str, list[ServiceLaunch]] = {}
    for launch in launches:
        by_model.setdefault(launch.weights.model_name, []).append(launch)
    return list(by_model.values())
