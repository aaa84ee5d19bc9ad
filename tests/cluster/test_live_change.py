"""What a live change does to one device entry, and the plan check before it: no Ray."""
from __future__ import annotations

import dataclasses

import pytest

from colocate.cluster.live_change import ChangeRefused, DeviceChange, check_fits, diff_device
from tests.deployment.helpers import cpu_deployment


@pytest.fixture
def old(tmp_path, tiny_model_dir):
    return cpu_deployment(tmp_path / "old", str(tiny_model_dir), ["a", "b", "c"],
                          memory="2GiB")


def new(tmp_path, tiny_model_dir, names, **kw):
    config = cpu_deployment(tmp_path / "new", str(tiny_model_dir), names, memory="2GiB", **kw)
    return config


def same_ports(old_config, new_config):
    """cpu_deployment picks free ports; a kept service keeps its port."""
    ports = {s.name: s.port for _, s in old_config.services()}
    gpu = new_config.gpus[0]
    services = tuple(dataclasses.replace(s, port=ports.get(s.name, s.port)) for s in gpu.services)
    return dataclasses.replace(new_config, gpus=(dataclasses.replace(gpu, services=services),))


def test_only_what_differs_is_added_removed_or_restarted(tmp_path, tiny_model_dir, old):
    target = same_ports(old, new(tmp_path, tiny_model_dir, ["a", "c", "d"],
                                 per_service={"c": {"kv_cache": {"tokens": 512}}}))
    change = diff_device(old.gpus[0], old, target.gpus[0], target)
    assert change == DeviceChange("cpu", add=("d",), remove=("b",), restart=("c",))
    assert change.summary() == "cpu: add d; remove b; restart c"
    assert diff_device(old.gpus[0], old, old.gpus[0], old).summary() == "cpu: unchanged"


def test_device_keys_models_in_use_and_fused_entries_are_refused(tmp_path, tiny_model_dir, old):
    bigger = dataclasses.replace(old.gpus[0], memory=2 * old.gpus[0].memory)
    with pytest.raises(ChangeRefused, match=r"cpu: gpus\[\]\.memory changed"):
        diff_device(old.gpus[0], old, bigger, old)
    models = {"m": dataclasses.replace(old.models["m"], dtype="bfloat16")}
    with pytest.raises(ChangeRefused, match="models.m changed while services"):
        diff_device(old.gpus[0], old, old.gpus[0], dataclasses.replace(old, models=models))
    fused = dataclasses.replace(old.gpus[0], batching="fused")
    fewer = dataclasses.replace(fused, services=fused.services[:2])
    with pytest.raises(ChangeRefused, match="batching: fused"):
        diff_device(fused, old, fewer, old)


def test_services_of_an_isolated_lending_circle_are_refused(tmp_path, tiny_model_dir, old):
    """Their block ranges of one pool file are fixed when the circle starts."""
    gpu = old.gpus[0]
    lending = dataclasses.replace(gpu, services=tuple(
        dataclasses.replace(s, kv_cache=dataclasses.replace(s.kv_cache, lend=s.name == "a"))
        for s in gpu.services))
    fewer = dataclasses.replace(lending, services=lending.services[:2])
    with pytest.raises(ChangeRefused, match=r"cpu: c share\(s\) a lending circle's one KV "
                                            r"pool file .*remove c"):
        diff_device(lending, old, fewer, old)
    # Turning lending on is a change to the circle too.
    with pytest.raises(ChangeRefused, match="lending circle"):
        diff_device(gpu, old, lending, old)
    # A service of another KV dtype is in no circle: it changes alone.
    int8 = dataclasses.replace(lending.services[2], kv_cache=dataclasses.replace(
        lending.services[2].kv_cache, dtype="int8"))
    apart = dataclasses.replace(lending, services=(*lending.services[:2], int8))
    smaller = dataclasses.replace(int8, max_num_seqs=int8.max_num_seqs + 1)
    change = diff_device(apart, old, dataclasses.replace(
        apart, services=(*lending.services[:2], smaller)), old)
    assert change.restart == ("c",)


def test_a_plan_that_does_not_fit_is_refused_with_the_plans_message(tmp_path, tiny_model_dir,
                                                                    old):
    check_fits(old.gpus[0], old, old.gpus[0].memory)
    huge = new(tmp_path, tiny_model_dir, ["a", "b", "c"],
               per_service={"b": {"kv_cache": {"budget": "3GiB"}}})
    with pytest.raises(ChangeRefused, match=r"cpu: the new plan does not fit: service b "
                                            r"refused: b does not fit on cpu: .* short by"):
        check_fits(huge.gpus[0], huge, huge.gpus[0].memory)
    # What other supervisors of the device hold counts as taken.
    with pytest.raises(ChangeRefused, match="held by other supervisors"):
        check_fits(old.gpus[0], old, old.gpus[0].memory, elsewhere=old.gpus[0].memory - 2**20)
