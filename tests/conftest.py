"""Shared fixtures: tiny checkpoints written once per session, and a check after
every test that every KV block pool got all its blocks back."""
from __future__ import annotations

import gc
import os
import weakref

import pytest

from colocate.engine.block_pool import BlockPool

# Every pool made in this process, so each test can be checked to have given all its
# blocks back. Recorded by wrapping the constructor here rather than by a registry in
# the engine: production code carries nothing for the tests.
LIVE_POOLS: "weakref.WeakSet[BlockPool]" = weakref.WeakSet()
_untracked_init = BlockPool.__init__


def _tracked_init(self, *args, **kwargs):
    _untracked_init(self, *args, **kwargs)
    LIVE_POOLS.add(self)


BlockPool.__init__ = _tracked_init


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from colocate.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_model_dir(tmp_path_factory):
    from colocate.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-gqa"), preset="tiny-gqa", seed=0)


@pytest.fixture(scope="session", autouse=True)
def private_device_ledger(tmp_path_factory):
    """Deployments under test book memory in a ledger of their own, not the host's
    /dev/shm one that real deployments on this machine share. Set before any Ray
    starts, so supervisors (Ray workers) and `colocate serve` subprocesses inherit it."""
    os.environ["COLOCATE_LEDGER_DIR"] = str(tmp_path_factory.mktemp("ledger"))
    yield


@pytest.fixture(autouse=True)
def block_pools_whole():
    """After each test: free blocks equal total and every ref count is 0, in every
    pool still alive (tests that leave a request running must abort it)."""
    yield
    gc.collect(0)
    for pool in list(LIVE_POOLS):
        pool.check_whole()


@pytest.fixture(autouse=True)
def service_pools_whole(request):
    """After each test that uses a module's running `deployment`: every service
    process's pool is empty again (read through GetStats), so a leak in a service
    shows in the test that caused it."""
    yield
    if "deployment" not in request.fixturenames:
        return
    from colocate.cluster.deploy import Deployment
    from tests.deployment.helpers import wait_service_pools_empty

    deployment = request.getfixturevalue("deployment")
    if isinstance(deployment, Deployment):
        wait_service_pools_empty(deployment)
