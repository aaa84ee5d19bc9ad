"""The tiny model quantized at load: logits and tokens against float, bytes held, LLM,
and the shared weight store publishing quantized weights once."""
from __future__ import annotations

import pytest
import torch

from colocate import LLM, SamplingParams
from colocate.memory.weight_store import WeightStore, attach, detach
from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches
from colocate.model.loader import load_model
from colocate.quant import linear_bytes, weight_bytes


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill one sequence; (T,) token ids -> (T, vocab) logits."""
    T, bs = ids.numel(), 16
    blocks = -(-T // bs)
    caches = allocate_kv_caches(model.config, blocks + 1, bs)               # block 0: null
    table, pos = torch.arange(1, blocks + 1), torch.arange(T)
    meta = AttentionMetadata(slot_mapping=table[pos // bs] * bs + pos % bs,
                             query_start_loc=[0, T], seq_lens=[T], block_tables=table[None],
                             block_size=bs)
    return model.compute_logits(model(ids, pos, caches, meta))


IDS = torch.randint(3, 2048, (48,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def float_logits(tiny_model_dir):
    return _logits(load_model(tiny_model_dir), IDS)


# Measured on the tiny preset (random weights, so near-flat logits: a hard case for
# argmax agreement; int4 of Gaussian weights is ~10% off per weight): relative L2 error
# of 48 positions' logits and the share of positions whose argmax agrees with float:
# int8 1.7% / 96%; int4 g128 23% / 65%; g64 20% / 69%; g32 19% / 71%.
@pytest.mark.parametrize("method,group,max_rel,min_agree", [
    ("int8", None, 0.03, 0.9), ("int4", 128, 0.3, 0.55), ("int4", 32, 0.25, 0.6)])
def test_logits_close_to_float(tiny_model_dir, float_logits, method, group, max_rel, min_agree):
    model = load_model(tiny_model_dir, quantization=method, quant_group_size=group)
    logits = _logits(model, IDS)
    rel = ((logits - float_logits).norm() / float_logits.norm()).item()
    agree = (logits.argmax(-1) == float_logits.argmax(-1)).float().mean().item()
    assert rel < max_rel and agree >= min_agree, (rel, agree)


def test_weight_bytes_shrink(tiny_model_dir):
    def linear_total(model):
        rows = [r for r in linear_bytes(model) if r.name.startswith("model.layers.")]
        return sum(r.bytes for r in rows), rows

    fp32, _ = linear_total(load_model(tiny_model_dir))
    int8, rows8 = linear_total(load_model(tiny_model_dir, quantization="int8"))
    int4, rows4 = linear_total(load_model(tiny_model_dir, quantization="int4"))
    # int8: 1 byte + one fp32 scale per output row; int4: half a byte + bf16 scale and
    # offset per 128 inputs.
    assert all(r.kind == "int8" and 1.0 < r.bytes_per_parameter < 1.04 for r in rows8)
    assert all(r.kind == "int4" and r.bytes_per_parameter == 0.5 + 4 / 128 for r in rows4)
    assert 3.9 < fp32 / int8 < 4.0 and 7.0 < fp32 / int4 < 7.6
    # The embeddings and lm_head stay fp32 and are counted too.
    q = load_model(tiny_model_dir, quantization="int4")
    assert q.model.embed_tokens.weight.dtype == q.lm_head.weight.dtype == torch.float32
    assert weight_bytes(q) == int4 + sum(p.nbytes for p in q.parameters())


def test_llm_generates_mostly_the_float_tokens(tiny_model_dir):
    """Greedy decoding free-runs, so one flipped near-tie changes everything after it;
    measured: int8 keeps the first 9 of 16 float tokens, int4 g128 the first 1."""
    params = SamplingParams(max_tokens=16, temperature=0.0, seed=0)
    prompt = [1, 15, 200, 33, 7]
    ref = LLM(str(tiny_model_dir)).generate([prompt], params)[0].token_ids
    int8 = LLM(str(tiny_model_dir), quantization="int8").generate([prompt], params)[0].token_ids
    int4 = LLM(str(tiny_model_dir), quantization="int4").generate([prompt], params)[0].token_ids
    assert len(int8) == len(int4) == 16
    assert int8[:8] == ref[:8] and int4[0] == ref[0], (ref, int8, int4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantization="int3"), "quantization='int3'"),
    (dict(quantization="int4", quant_group_size=48), "quant_group_size=48"),
    (dict(quantization="int4", quant_group_size=256), "quant_group_size=256"),
])
def test_bad_settings_name_themselves(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_model_dir), **kwargs)


def test_group_size_not_dividing_a_layer(tmp_path):
    from colocate.quant.config import QuantConfig
    from colocate.quant.handler import quantize_weight

    with pytest.raises(ValueError, match="quant_group_size=64 does not divide"):
        quantize_weight(QuantConfig("int4", group_size=64, layout="tinygemm"),
                        torch.zeros(32, 96), torch.float32)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_store_publishes_once_and_attach_matches_llm(tiny_model_dir, tmp_path, monkeypatch,
                                                     method):
    from colocate.memory import weight_store

    reads = []
    real = weight_store.read_hf_tensors
    monkeypatch.setattr(weight_store, "read_hf_tensors", lambda *a: reads.append(a) or real(*a))
    with WeightStore("cpu", root=tmp_path) as store:
        h = store.publish("tiny", tiny_model_dir, "float32", quantization=method,
                          quant_group_size=64)
        assert store.publish("tiny", tiny_model_dir, "float32", quantization=method,
                             quant_group_size=64) is h
        assert len(reads) == 1 and h.quantization["method"] == method
        with pytest.raises(ValueError, match="already published"):
            store.publish("tiny", tiny_model_dir, "float32")                 # unquantized
        a, b = attach(h), attach(h)
        qkv_a = a.model.layers[0].self_attn.qkv_proj
        assert qkv_a.qweight.data_ptr() == b.model.layers[0].self_attn.qkv_proj.qweight.data_ptr()
        assert store.bytes_of("tiny") >= weight_bytes(a) == h.tensor_bytes
        llm = LLM(str(tiny_model_dir), quantization=method, quant_group_size=64)
        assert torch.equal(_logits(a, IDS), _logits(llm.model, IDS))
        detach(h)
