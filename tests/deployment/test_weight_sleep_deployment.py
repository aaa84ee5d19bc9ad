"""The weights sleep through the real supervisor, Ray and gRPC: one service of the tiny
checkpoint with `sleep_after_idle: 2s`. Its model is published on disk, not in
/dev/shm; once the service sleeps, the file's pages leave the page cache (no process
maps them any more), and the next request reads them back and answers as before."""
from __future__ import annotations

import time

import pytest

from colocate.cluster.deploy import Deployment
from colocate.memory.weight_store import DIR_PREFIX, disk_root
from tests.deployment.helpers import cpu_deployment, stream_tokens, token_of
from tests.memory.test_weight_pages import resident_fraction

GREEDY = dict(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def deployment(ray_session, tiny_model_dir, tmp_path_factory):
    before = set(disk_root().glob(f"{DIR_PREFIX}*/*.bin"))
    config = cpu_deployment(tmp_path_factory.mktemp("weight-sleep"), str(tiny_model_dir),
                            ["solo"], per_service={"solo": {"sleep_after_idle": "2s"}})
    with Deployment(config, torch_threads=1, health_interval_s=0.5) as dep:
        dep.wait_ready(timeout=180)
        (dep.weight_file,) = set(disk_root().glob(f"{DIR_PREFIX}*/*.bin")) - before
        yield dep


def wait_asleep(deployment, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        (device,) = deployment.status()
        (row,) = device["services"]
        if row["stats"].sleeping:
            return
        assert time.monotonic() < deadline, "solo never fell asleep"
        time.sleep(0.2)


def test_the_weights_leave_memory_while_the_service_sleeps(deployment, targets):
    answer = stream_tokens(targets["solo"], token_of("solo"), "The quick brown fox", **GREEDY)
    wait_asleep(deployment)
    assert resident_fraction(str(deployment.weight_file)) < 0.1
    again = stream_tokens(targets["solo"], token_of("solo"), "The quick brown fox", **GREEDY)
    assert again == answer
    assert resident_fraction(str(deployment.weight_file)) > 0.5     # read back, in use
