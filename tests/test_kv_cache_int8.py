"""int8 KV cache on the CPU path: accuracy against fp32 KV, the memory it takes, and
load-time errors."""
from __future__ import annotations

import pytest
import torch

from colocate import LLM, SamplingParams
from colocate.config import ModelSpec
from colocate.engine.config import EngineConfig
from colocate.worker.engine_factory import build_engine
from colocate.memory.sizing import ModelFootprint
from colocate.model.kv_cache import quantize_kv
from colocate.model.llama import allocate_kv_caches
from colocate.quant.loading import load_model
from tests.model_steps import run_schedule


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_quantize_kv_round_trips_within_half_a_step():
    x = torch.randn(5, 3, 32) * torch.logspace(-3, 2, 5)[:, None, None]
    x[1, 2] = 0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (5, 3)
    assert q.abs().max() <= 127 and s[1, 2] == 0 and not q[1, 2].any()
    err = (q.float() * s[..., None] - x).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all()


def test_int8_logits_stay_close_to_fp32(tiny):
    ref = run_schedule(tiny, torch.float32)
    got = run_schedule(tiny, torch.int8)
    for g, r in zip(got, ref):
        assert (g - r).abs().max() < 0.02 * r.abs().max()      # measured: about 0.6%
        assert torch.nn.functional.cosine_similarity(g, r, dim=-1).min() > 0.999


def test_int8_prefill_does_not_depend_on_chunking(tiny):
    """Attention reads back what the cache holds, so one 14-token step and 9 + 5 agree up
    to the odd int8 code that float rounding tips across a rounding boundary, far below
    the int8-vs-fp32 difference. Not to the bit even on the first 9 tokens, whose keys
    are the same: torch's CPU flash attention splits its sums by the step's row and key
    counts, so layer 0's outputs (and the codes of layer 1's keys) may differ in the
    last bit (measured: 1.4e-3 under ATEN_CPU_CAPABILITY=default, 4e-6 natively, against
    an int8 error of 0.045)."""
    whole = run_schedule(tiny, torch.int8, schedule=[(14, 6)])[0]
    chunks = run_schedule(tiny, torch.int8, schedule=[(9, 6), (5, 0)])
    fp32 = run_schedule(tiny, torch.float32, schedule=[(14, 6)])[0]
    quant_err = (whole - fp32).abs().max()
    assert (chunks[0][:9] - whole[:9]).abs().max() < quant_err / 4
    assert (chunks[1] - whole[9:14]).abs().max() < quant_err / 4


def test_greedy_generation_agrees_with_fp32_kv(tiny_model_dir):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[1, 15, 300, 77, 1000, 5, 9, 12, 8, 600], "hello world, the"]
    ref = LLM(str(tiny_model_dir), kv_cache_tokens=256).generate(prompts, params)
    got = LLM(str(tiny_model_dir), kv_cache_tokens=256, kv_cache_dtype="int8").generate(
        prompts, params)
    for g, r in zip(got, ref):
        assert g.token_ids[:4] == r.token_ids[:4]


def test_int8_cache_bytes_match_the_memory_planner(tiny, tiny_model_dir):
    num_blocks, block_size = 5, 16
    caches = allocate_kv_caches(tiny.config, num_blocks, block_size, torch.int8)
    assert caches[0].key.dtype == torch.int8
    assert caches[0].key_scale.shape == (num_blocks, block_size, tiny.config.num_key_value_heads)
    per_token = sum(c.nbytes() for c in caches) // (num_blocks * block_size)
    footprint = ModelFootprint.of(ModelSpec(name="tiny", path=str(tiny_model_dir)))
    assert per_token == footprint.kv_bytes_per_token("int8")
    fp32 = allocate_kv_caches(tiny.config, num_blocks, block_size, torch.float32)
    # About 4x fewer bytes than fp32 (2x fewer than fp16), scales included.
    assert sum(c.nbytes() for c in fp32) / sum(c.nbytes() for c in caches) > 3.5


@pytest.mark.parametrize("bad", ["fp8", "INT8", "", None, "float16"])
def test_unknown_kv_cache_dtype_fails_at_load(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(str(tiny_model_dir), kv_cache_dtype=bad)


@pytest.mark.parametrize("kv_cache_dtype, device", [
    ("int4", "cpu"),              # no such KV dtype
    ("int8", "meta"),             # int8 KV on a device that has no int8 KV path
])
def test_build_engine_refuses_a_kv_cache_dtype_it_cannot_run(tiny, kv_cache_dtype, device):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        build_engine(tiny, tiny.config, None,
                     EngineConfig(max_model_len=64, kv_cache_tokens=48, max_num_seqs=2,
                                  max_num_batched_tokens=64, kv_cache_dtype=kv_cache_dtype),
                     dtype=torch.float32, device=torch.device(device))
