"""One deployment of three tiny services for the isolation and fault tests.

Started once (startup is most of the cost here) with the fault hooks on, a short
health interval and a short ping timeout, so a restart is seen in seconds. Tests
that restart a service wait until it runs again before they return.
"""
from __future__ import annotations

import pytest

from tests.deployment.conftest import ray_session  # noqa: F401  (the shared Ray)
from tests.faults import HOOKS
from tests.reliability.reliability_helpers import reliability_deployment

HEALTH_INTERVAL_S = 0.3
HEALTH_TIMEOUT_S = 1.0
FAILED_CHECKS = 3

# svc-a is the one that gets flooded and squeezed: a small queue and a small pool.
SERVICES = {
    "svc-a": dict(kv_tokens=256, max_model_len=512, max_queued_requests=4),
    "svc-b": dict(),
    "svc-c": dict(max_num_seqs=1, max_queued_requests=2),
}


@pytest.fixture(scope="package")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):  # noqa: F811
    from colocate.cluster.deploy import Deployment

    config = reliability_deployment(tmp_path_factory.mktemp("reliability"),
                                    str(tiny_model_dir), SERVICES)
    # One torch thread each, as the offline references use: the thread count can
    # change float summation order, and so a token.
    with Deployment(config, torch_threads=1, health_interval_s=HEALTH_INTERVAL_S,
                    health_timeout_s=HEALTH_TIMEOUT_S,
                    failed_checks_before_restart=FAILED_CHECKS, test_hooks=HOOKS,
                    shutdown_grace_s=5.0) as dep:
        dep.wait_ready(timeout=180)
        yield dep


@pytest.fixture(scope="package")
def targets(deployment):
    return {e.service: e.target for e in deployment.endpoints()}


@pytest.fixture(scope="package")
def supervisor(deployment):
    return deployment.supervisor("cpu")
