"""`max_prefill_tokens_per_mixed_step` in the deployment YAML: per service, into the
engine it builds, the strictest member's for a fused group, errors naming the key."""
from __future__ import annotations

import pytest
import torch

from colocate.config import load_config
from colocate.engine.config import EngineConfig
from colocate.engine.scheduler import DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP
from colocate.quant.loading import load_model
from colocate.worker.engine_factory import GroupMember, build_engine_group
from tests.test_config import ENV, base_config, load_error, write

KEY = "gpus[0].services[0].max_prefill_tokens_per_mixed_step"


def test_each_service_sets_its_own_and_the_engine_gets_it(tmp_path):
    data = base_config()
    data["gpus"][0]["services"][0]["max_prefill_tokens_per_mixed_step"] = 64
    config = load_config(write(tmp_path, data), env=ENV)
    a, b = config.gpus[0].services
    assert (a.max_prefill_tokens_per_mixed_step, b.max_prefill_tokens_per_mixed_step) == (
        64, DEFAULT_MAX_PREFILL_TOKENS_PER_MIXED_STEP)
    assert EngineConfig.from_service(a, 256).max_prefill_tokens_per_mixed_step == 64


def test_a_fused_group_caps_its_mixed_steps_at_the_strictest_member(tmp_path, tiny_model_dir):
    data = base_config()
    data["gpus"][0]["batching"] = "fused"
    data["gpus"][0]["services"][1]["max_prefill_tokens_per_mixed_step"] = 48
    for service in data["gpus"][0]["services"]:
        service["kv_cache"]["dtype"] = "auto"      # one cache: one dtype
    config = load_config(write(tmp_path, data), env=ENV)
    model = load_model(tiny_model_dir)
    group = build_engine_group(
        model, model.config, None,
        [GroupMember(s.name, EngineConfig.from_service(s, 256)) for s in config.gpus[0].services],
        dtype=torch.float32, device=torch.device("cpu"), max_num_batched_tokens=512)
    assert group.max_prefill_tokens_per_mixed_step == 48


@pytest.mark.parametrize("raw, problem", [(0, "out of range; must be >= 1"),
                                          ("64", "expected an integer"),
                                          (True, "expected an integer")])
def test_bad_values_name_the_key(tmp_path, raw, problem):
    data = base_config()
    data["gpus"][0]["services"][0]["max_prefill_tokens_per_mixed_step"] = raw
    message = load_error(tmp_path, data)
    assert f"{KEY}: " in message and problem in message, message
