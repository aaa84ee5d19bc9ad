"""What three services of the tiny checkpoint must give whatever their batching.

`isolated` (a process per service) and `fused` (one process, one batch) differ in how
they run and must not differ in what a tenant sees. A test module that starts such a
deployment mixes `ServiceContract` into a class (its `deployment`/`targets` fixtures
are the module's) and so runs these checks against its own deployment.
"""
from __future__ import annotations

import contextlib

import grpc
import pytest

from colocate.cluster.deploy import Deployment
from tests.deployment.helpers import (cpu_deployment, offline_and_concurrent, stream_tokens,
                                      token_of)

KV_TOKENS = 256                               # 16 blocks per service


def requests_for(names: list[str]) -> dict:
    """Each service its own prompt and sampling, so a mix-up between them shows."""
    a, b, c = names
    return {
        a: ("The quick brown fox", dict(max_tokens=16, temperature=0.0)),
        b: ("Once upon a time", dict(max_tokens=16, temperature=0.8, seed=7)),
        c: ([1, 50, 60, 70, 80], dict(max_tokens=16, temperature=1.0, top_k=40, seed=3)),
    }


@contextlib.contextmanager
def three_services(workdir, model_dir, names, *, device_extra=None, per_service=None,
                   **deployment_options):
    """A ready deployment of `names` on the CPU. One torch thread each, as the offline
    reference uses: thread count can change float summation order, and so a sampled
    token."""
    config = cpu_deployment(workdir, str(model_dir), names, kv_tokens=KV_TOKENS,
                            device_extra=device_extra, per_service=per_service)
    with Deployment(config, torch_threads=1, health_interval_s=0.5,
                    **deployment_options) as dep:
        dep.wait_ready(timeout=180)
        yield dep


class ServiceContract:
    NAMES: list[str]

    def test_concurrent_streams_match_offline_llm(self, targets, tiny_model_dir):
        expected, got = offline_and_concurrent(targets, requests_for(self.NAMES),
                                               tiny_model_dir, KV_TOKENS)
        assert got == expected
        assert all(len(t) == 16 for t in got.values())

    def test_another_services_token_is_unauthenticated(self, targets):
        a, b, _ = self.NAMES
        with pytest.raises(grpc.RpcError) as err:
            stream_tokens(targets[a], token_of(b), "Hello", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
