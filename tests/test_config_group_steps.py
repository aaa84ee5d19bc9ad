"""The keys that shape a fused group's steps, in the deployment YAML:
`max_prefill_tokens_per_mixed_step` and `time_slice`. Each is per service, reaches the
engine it builds, a fused group takes its strictest member's, and bad values are
errors naming the key."""
from __future__ import annotations

import pytest
import torch

from colocate.config import load_config
from colocate.engine.config import EngineConfig
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
from colocate.engine.time_shares import DEFAULT_TIME_SLICE_S
from colocate.quant.loading import load_model
from colocate.worker.engine_factory import GroupMember, build_engine_group
from tests.test_config import ENV, base_config, load_error, write

# YAML key: (a value, what the spec then holds, the default, the engine's field, the
# group's attribute for it).
KEYS = {
    "max_prefill_tokens_per_mixed_step": (
        64, 64, DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP,
        "max_prefill_tokens_per_mixed_step",
        lambda group: group.max_prefill_tokens_per_mixed_step),
    "time_slice": ("20ms", 0.02, DEFAULT_TIME_SLICE_S, "time_slice_s",
                   lambda group: group.time_shares.slice_s),
}


@pytest.mark.parametrize("key", KEYS)
def test_each_service_sets_its_own_and_the_engine_gets_it(tmp_path, key):
    raw, held, default, engine_field, _ = KEYS[key]
    data = base_config()
    data["gpus"][0]["services"][0][key] = raw
    config = load_config(write(tmp_path, data), env=ENV)
    a, b = config.gpus[0].services
    assert (getattr(a, key), getattr(b, key)) == pytest.approx((held, default))
    assert getattr(EngineConfig.from_service(a, 256), engine_field) == pytest.approx(held)


@pytest.mark.parametrize("key", KEYS)
def test_a_fused_group_takes_the_strictest_member(tmp_path, tiny_model_dir, key):
    raw, held, _, _, of_group = KEYS[key]
    data = base_config()
    data["gpus"][0]["batching"] = "fused"
    data["gpus"][0]["services"][1][key] = raw
    for service in data["gpus"][0]["services"]:
        service["kv_cache"]["dtype"] = "auto"      # one cache: one dtype
    config = load_config(write(tmp_path, data), env=ENV)
    model = load_model(tiny_model_dir)
    group = build_engine_group(
        model, model.config, None,
        [GroupMember(s.name, EngineConfig.from_service(s, 256)) for s in config.gpus[0].services],
        dtype=torch.float32, device=torch.device("cpu"), max_num_batched_tokens=512)
    assert of_group(group) == pytest.approx(held)


@pytest.mark.parametrize("key, raw, problem", [
    ("max_prefill_tokens_per_mixed_step", 0, "out of range; must be >= 1"),
    ("max_prefill_tokens_per_mixed_step", "64", "expected an integer"),
    ("max_prefill_tokens_per_mixed_step", True, "expected an integer"),
    ("time_slice", 0, "> 0"),
    ("time_slice", "fast", "bad duration 'fast'"),
    ("time_slice", True, ""),
])
def test_bad_values_name_the_key(tmp_path, key, raw, problem):
    data = base_config()
    data["gpus"][0]["services"][0][key] = raw
    message = load_error(tmp_path, data)
    assert f"gpus[0].services[0].{key}: " in message and problem in message, message


def test_an_engine_refuses_a_slice_of_no_time():
    with pytest.raises(ValueError, match="time_slice_s must be > 0"):
        EngineConfig(max_model_len=64, kv_cache_tokens=64, time_slice_s=0.0)
