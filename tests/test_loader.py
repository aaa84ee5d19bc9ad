"""load_model: single and sharded safetensors, dtypes, tied embeddings, and errors that name the culprit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from colocate.model.attention_metadata import AttentionMetadata
from colocate.model.llama import allocate_kv_caches
from colocate.quant.loading import load_model
from colocate.model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny")


def variant(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy a checkpoint, letting the caller change its tensors dict and / or config dict."""
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(str(dst / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dst / "model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def greedy_logits(model, n: int = 24) -> torch.Tensor:
    """Logits of one n-token prompt, in a cache of the model's dtype."""
    dtype = model.model.embed_tokens.weight.dtype
    caches = allocate_kv_caches(model.config, 4, 16, dtype)
    meta = AttentionMetadata(torch.arange(16, 16 + n), [0, n], [n], torch.tensor([[1, 2]]), 16)
    ids = torch.arange(5, 5 + n)
    return model.compute_logits(model(ids, torch.arange(n), caches, meta))


def test_loads_all_weights_fused(tiny):
    model = load_model(tiny)
    raw = load_file(str(tiny / "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    expected = torch.cat([raw[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, expected)
    assert torch.equal(model.lm_head.weight, raw["lm_head.weight"])
    assert not any(p.is_meta for p in model.parameters())
    assert not model.rotary.cos_sin.is_meta


def test_missing_tensor_is_named(tiny, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = variant(tiny, tmp_path / "m", edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor '{name}'"):
        load_model(bad)


def test_shape_mismatch_names_tensor_and_shapes(tiny, tmp_path):
    name = "model.layers.2.self_attn.k_proj.weight"

    def shrink(t):
        t[name] = t[name][:64].contiguous()
    bad = variant(tiny, tmp_path / "m", edit_tensors=shrink)
    with pytest.raises(ValueError, match=rf"'{name}' has shape \(64, 128\), expected \(128, 128\)"):
        load_model(bad)


def test_unsupported_architecture_is_named(tiny, tmp_path):
    bad = variant(tiny, tmp_path / "m",
                  edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(bad)


def test_bad_dtype_is_named(tiny):
    with pytest.raises(ValueError, match="float64"):
        load_model(tiny, dtype="float64")


def test_missing_weights_file(tiny, tmp_path):
    bad = tmp_path / "m"
    bad.mkdir()
    shutil.copy(tiny / "config.json", bad)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(bad)


def test_extra_tensors_are_ignored(tiny, tmp_path):
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    ok = variant(tiny, tmp_path / "m", edit_tensors=lambda t: t.update({extra: torch.ones(16)}))
    torch.testing.assert_close(greedy_logits(load_model(ok)), greedy_logits(load_model(tiny)),
                               rtol=0, atol=0)


def test_sharded_checkpoint(tiny, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny, sharded)
    (sharded / "model.safetensors").unlink()
    tensors = load_file(str(tiny / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file))
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))

    torch.testing.assert_close(greedy_logits(load_model(sharded)), greedy_logits(load_model(tiny)),
                               rtol=0, atol=0)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(sharded)


def test_tied_embeddings(tiny, tmp_path):
    tied = variant(tiny, tmp_path / "m", edit_tensors=lambda t: t.pop("lm_head.weight"),
                   edit_config=lambda c: c.update(tie_word_embeddings=True))
    model = load_model(tied)
    assert model.lm_head is None
    h = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(model.compute_logits(h), h @ model.model.embed_tokens.weight.T)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(tiny, dtype):
    model = load_model(tiny, dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {torch_dtype}
    assert model.rotary.cos_sin.dtype == torch_dtype
    logits = greedy_logits(model)
    assert logits.dtype == torch.float32
    ref = greedy_logits(load_model(tiny))
    # Half precision rounds, but the model must still be the same model.
    assert (logits - ref).abs().max() < 0.25 * ref.std()
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


def test_auto_dtype_follows_config(tiny, tmp_path):
    bf16 = variant(tiny, tmp_path / "m", edit_config=lambda c: c.update(torch_dtype="bfloat16"))
    assert load_model(bf16, dtype="auto").model.norm.weight.dtype == torch.bfloat16


def test_unsupported_rope_type_is_named(tiny, tmp_path):
    bad = variant(tiny, tmp_path / "m",
                  edit_config=lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="'yarn'"):
        load_model(bad)
