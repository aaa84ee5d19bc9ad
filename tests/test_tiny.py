"""write_tiny_checkpoint: deterministic bytes, preset sizes, and a layout HF transformers accepts."""
from __future__ import annotations

import pytest
import torch
import transformers

from colocate.model.model_config import LlamaConfig
from colocate.model.tiny import PRESETS, build_tokenizer, preset_config, write_tiny_checkpoint

FILES = ["config.json", "generation_config.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json"]


def file_bytes(path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in FILES}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = file_bytes(write_tiny_checkpoint(tmp_path / "a", "tiny", seed=0))
    b = file_bytes(write_tiny_checkpoint(tmp_path / "b", "tiny", seed=0))
    c = file_bytes(write_tiny_checkpoint(tmp_path / "c", "tiny", seed=1))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] != c["tokenizer.json"]


@pytest.mark.parametrize("preset,low,high", [
    ("tiny", 1.0e6, 5e6), ("tiny-gqa", 2e6, 8e6), ("small", 100e6, 115e6)])
def test_parameter_counts(preset, low, high):
    assert low <= LlamaConfig.from_dict(preset_config(preset)).num_parameters() <= high


def test_unknown_preset_is_named(tmp_path):
    with pytest.raises(ValueError, match="'huge'"):
        write_tiny_checkpoint(tmp_path, "huge")


def test_small_tokenizer_is_exact():
    tok = build_tokenizer(PRESETS["small"]["vocab_size"], seed=0)
    assert tok.get_vocab_size(with_added_tokens=True) == 32000
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_hf_loads_without_missing_keys(tmp_path, preset):
    path = write_tiny_checkpoint(tmp_path, preset)
    model, info = transformers.LlamaForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 1
    # Logits spread enough (std of order 1-3) that greedy choices are not near-ties.
    with torch.no_grad():
        std = model(torch.tensor([ids])).logits.std().item()
    assert 1.0 < std < 3.0
