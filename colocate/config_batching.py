"""What each `batching:` mode of a device entry allows its services to ask for.

`fused` runs the services of one model in one process over one copy of the weights
and one KV cache tensor (each service its own block range of it); `isolated` runs a
process per service, each with a pool of its own. Some service keys only make sense
in one of them, and the reasons are the memory layouts:

- `fused` needs `share_weights: true`: one forward runs over one copy.
- On CUDA, a `fused` group (the services of one model) gives every service the same
  `sleep_after_idle`, or none: a member's range lies inside the group's one cache
  allocation, which CUDA frees only whole (freeing part of it needs virtual memory
  mapping of its pages), so the group sleeps whole. On CPU each member sleeps after
  its own: the pages of its range are given back alone (colocate/engine/cache_sleep.py).
- `kv_cache.lend` with `isolated` needs a CPU device: lending moves blocks between
  pools, which is free when every pool is a range of one tensor in one process
  (fused), and on CPU isolated processes can share one pool file with per-service
  block ranges (colocate/engine/shared_lending.py). On CUDA each isolated process
  has an allocation of its own, and moving memory between them needs virtual memory
  mapping of physical pages (as kvcached does), which is not built.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from colocate.config_values import ConfigError


def check_batching(error: Callable[[str, str], ConfigError], key: str, batching: str,
                   share_weights: bool, services: Sequence, device: str = "cpu") -> None:
    """Raise the first rule of `batching` that the entry at `key` (on `device`) breaks."""
    if batching == "fused" and not share_weights:
        raise error(f"{key}.batching", "fused batching runs one forward over one copy "
                                       "of the weights; it needs share_weights: true")
    first_of_model: dict[str, int] = {}     # model -> its group's first service
    for i, service in enumerate(services):
        first = first_of_model.setdefault(service.model, i)
        idle = services[first].sleep_after_idle
        if (batching == "fused" and not device.startswith("cpu")
                and service.sleep_after_idle != idle):
            raise error(f"{key}.services[{i}].sleep_after_idle",
                        f"the services of model {service.model!r} share one KV cache "
                        f"allocation in batching: fused, which {device} frees only whole, "
                        f"so they sleep together: give each the same sleep_after_idle as "
                        f"services[{first}] ({_seconds(idle)})")
        if batching == "isolated" and service.kv_cache.lend and not device.startswith("cpu"):
            raise error(f"{key}.services[{i}].kv_cache.lend", f"needs batching: fused on "
                        f"{device}: isolated services there each have an allocation of "
                        "their own, and moving blocks between processes needs CUDA virtual "
                        "memory mapping, which is not built (on CPU they share one pool file)")


def _seconds(value: float | None) -> str:
    return "not set" if value is None else f"{value:g}s"
