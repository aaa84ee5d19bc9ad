"""The one seam through which a test reaches into a running service.

A service is launched with `test_hooks=None` in production: then nothing here runs,
its runner is its own and `inject_fault` is refused. A test launches a deployment with
`test_hooks="tests.faults:FaultInjector"`: the service's own process imports that
factory (Ray workers share the driver's working directory, so `tests` is importable
there) and routes the two places faults are planted through the object it makes:

- `wrap_runner(runner)` -> a runner that may raise before a step;
- `on_ping()` -> False (or late) for a health ping the test wants to fail;
- `arm(kind, count, message=..., seconds=...)` -> what `inject_fault` forwards.

The fault logic itself lives with the tests (tests/faults.py), not in the package.
"""
from __future__ import annotations

import importlib


def load_test_hooks(spec: str | None):
    """The hooks object `spec` ("module:factory") names, made in this process; None
    when `spec` is None (production)."""
    if spec is None:
        return None
    module, sep, factory = spec.partition(":")
    if not sep or not module or not factory:
        raise ValueError(f"test_hooks must be 'module:factory', got {spec!r}")
    return getattr(importlib.import_module(module), factory)()


def ping_allowed(hooks) -> bool:
    """What the hooks say of the next health ping (always True without hooks)."""
    return hooks is None or hooks.on_ping()


def arm(hooks, kind: str, count: int, message: str, seconds: float) -> None:
    """Forward `inject_fault` to the hooks; refused in a service launched without them."""
    if hooks is None:
        raise PermissionError("fault injection is off for this service "
                              "(launch the deployment with test_hooks=...)")
    hooks.arm(kind, count, message=message, seconds=seconds)
