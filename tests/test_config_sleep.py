"""`sleep_after_idle` in the deployment YAML: durations, and the errors naming the key."""
from __future__ import annotations

import pytest

from colocate.config import load_config
from tests.test_config import ENV, base_config, load_error, write

KEY = "gpus[0].services[0].sleep_after_idle"


@pytest.mark.parametrize("raw, seconds", [("2s", 2.0), ("500ms", 0.5), ("10m", 600.0),
                                          ("1.5h", 5400.0), (3, 3.0), (0.25, 0.25)])
def test_durations(tmp_path, raw, seconds):
    data = base_config()
    data["gpus"][0]["services"][0]["sleep_after_idle"] = raw
    config = load_config(write(tmp_path, data), env=ENV)
    a, b = config.gpus[0].services
    assert (a.sleep_after_idle, b.sleep_after_idle) == (seconds, None)   # off by default


@pytest.mark.parametrize("raw, problem", [("2 days", "bad duration '2 days'"),
                                          ("s", "bad duration"), ("0s", "expected a number > 0"),
                                          (-1, "expected a number > 0"), (True, "> 0")])
def test_bad_durations_name_the_key(tmp_path, raw, problem):
    data = base_config()
    data["gpus"][0]["services"][0]["sleep_after_idle"] = raw
    message = load_error(tmp_path, data)
    assert f"{KEY}: " in message and problem in message, message


def test_fused_cpu_members_each_sleep_after_their_own(tmp_path):
    data = base_config()
    data["gpus"][0]["batching"] = "fused"
    data["gpus"][0]["services"][0]["sleep_after_idle"] = "2s"
    data["gpus"][0]["services"][1]["sleep_after_idle"] = "3s"
    config = load_config(write(tmp_path, data), env=ENV)
    assert [s.sleep_after_idle for s in config.gpus[0].services] == [2.0, 3.0]


def test_a_fused_cuda_group_sleeps_whole_so_its_services_agree(tmp_path):
    data = base_config()
    cuda = data["gpus"][1]
    cuda.update(batching="fused", share_weights=True)
    cuda["services"].append({**cuda["services"][0], "name": "svc-d", "port": 50054})
    for service in cuda["services"]:
        service["sleep_after_idle"] = "2s"
    config = load_config(write(tmp_path, data), env=ENV)
    assert [s.sleep_after_idle for s in config.gpus[1].services] == [2.0, 2.0]
    cuda["services"][1]["sleep_after_idle"] = "3s"
    message = load_error(tmp_path, data)
    key = "gpus[1].services[1].sleep_after_idle"
    assert f"{key}: the services of model 'm' share one KV cache allocation" in message
    assert "which cuda:0 frees only whole" in message, message
    assert "same sleep_after_idle as services[0] (2s)" in message, message
    del cuda["services"][1]["sleep_after_idle"]
    assert "(2s)" in load_error(tmp_path, data)
    del cuda["services"][0]["sleep_after_idle"]
    cuda["services"][1]["sleep_after_idle"] = "3s"
    assert "services[0] (not set)" in load_error(tmp_path, data)
