"""One served deployment (two services of the tiny model) for every test here that
watches one: colocate top and the progress its start reported."""
from __future__ import annotations

import dataclasses

import pytest

from colocate.cluster.deploy import Deployment
from tests.deployment.conftest import ray_session  # noqa: F401  (the shared Ray)
from tests.deployment.helpers import cpu_deployment, free_ports

NAMES = ["top-a", "top-b"]


@pytest.fixture(scope="package")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    config = cpu_deployment(tmp_path_factory.mktemp("top"), str(tiny_model_dir), NAMES)
    (port,) = free_ports(1)
    config = dataclasses.replace(config, gpus=(dataclasses.replace(config.gpus[0],
                                                                   metrics_port=port),))
    with Deployment(config, torch_threads=1) as dep:
        dep.wait_ready(timeout=180)
        yield dep
