"""`kv_cache.lend` in the deployment YAML: off by default; fused groups anywhere,
isolated services on CPU only (they share one pool file there)."""
from __future__ import annotations

import pytest

from colocate.config import load_config
from tests.test_config import ENV, base_config, load_error, write


def fused(lend_b) -> dict:
    data = base_config()
    data["gpus"][0]["batching"] = "fused"
    data["gpus"][0]["services"][1]["kv_cache"]["lend"] = lend_b
    return data


def test_lend_is_read_and_off_by_default(tmp_path):
    config = load_config(write(tmp_path, fused(True)), env=ENV)
    a, b = config.gpus[0].services
    assert (a.kv_cache.lend, b.kv_cache.lend) == (False, True)
    assert b.kv_cache.tokens == 4096                   # the other keys still read


@pytest.mark.parametrize("raw", ["yes", 1, None])
def test_lend_must_be_a_boolean(tmp_path, raw):
    message = load_error(tmp_path, fused(raw))
    assert "gpus[0].services[1].kv_cache.lend: expected true or false" in message, message


def test_isolated_services_lend_on_cpu(tmp_path):
    data = base_config()                                # batching: isolated by default
    data["gpus"][0]["services"][1]["kv_cache"]["lend"] = True
    config = load_config(write(tmp_path, data), env=ENV)
    assert config.gpus[0].batching == "isolated"
    assert [s.kv_cache.lend for s in config.gpus[0].services] == [False, True]


def test_isolated_services_on_cuda_cannot_lend(tmp_path):
    data = base_config()
    data["gpus"][1]["services"][0]["kv_cache"]["lend"] = True
    message = load_error(tmp_path, data)
    assert "gpus[1].services[0].kv_cache.lend: needs batching: fused on cuda:0" in message, message
    assert "virtual memory mapping" in message, message
