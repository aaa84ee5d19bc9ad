"""One Ray per test session, shared by every deployment the tests start."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from colocate.cluster.deploy import init_ray

    started = init_ray(None)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def targets(deployment):
    """service -> the target its tenants dial, for the module's `deployment`."""
    return {e.service: e.target for e in deployment.endpoints()}
