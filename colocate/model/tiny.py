"""Deterministic random LLaMA checkpoints in HF layout, for demos, tests and benchmarks.

A checkpoint is config.json, generation_config.json, model.safetensors, tokenizer.json
and tokenizer_config.json, so both colocate and transformers load it. The same preset
and seed always give byte-identical files: the weights come from a seeded torch
generator in a fixed order, and the tokenizer is a byte-level BPE trained on a corpus
generated from the same seed.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from colocate.model.checkpoint import hf_tensor_shapes
from colocate.model.model_config import LlamaConfig

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]     # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2

_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "float32",
    "initializer_range": 0.02,
}

_SHAPES: dict[str, dict[str, Any]] = {
    # About 1.6M parameters, multi-head attention: the fast default for tests.
    "tiny": {
        "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
    # About 3.3M parameters, GQA 8 / 2, Llama-3.1 RoPE scaling with a short original
    # context (64) so the scaled frequencies are exercised at test lengths.
    "tiny-gqa": {
        "vocab_size": 2048, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    },
    # About 110M parameters, tied embeddings, LLaMA-2 vocab size: the benchmark model.
    "small": {
        "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
    },
}


# preset name -> the complete config.json it writes (LlamaConfig.from_dict reads it as is)
PRESETS: dict[str, dict[str, Any]] = {name: {**_COMMON, **shape} for name, shape in _SHAPES.items()}


def preset_config(preset: str) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return json.loads(json.dumps(PRESETS[preset]))     # a deep copy: callers may edit it


def write_tiny_checkpoint(dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write the preset's checkpoint into `dir` (created if needed) and return its path."""
    cfg = preset_config(preset)
    weights = random_weights(LlamaConfig.from_dict(cfg), seed)
    return write_checkpoint(dir, cfg, weights, build_tokenizer(cfg["vocab_size"], seed))


def write_checkpoint(dir: str | Path, cfg: dict[str, Any], weights: dict[str, torch.Tensor],
                     tokenizer: Tokenizer) -> Path:
    """Write an HF-layout checkpoint: config, generation config, weights, tokenizer."""
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", cfg)
    _write_json(path / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False})
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": cfg["max_position_embeddings"],
    })
    return path


def random_weights(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors, drawn in sorted-name order from one seeded generator.

    Linear weights are N(0, 1/fan_in) so activations keep unit scale through the layers,
    and the output projection is N(0, 4/hidden) so logits over the final RMS-normed
    state have a std near 2: greedy choices are then clear, not near-ties that float
    rounding could flip between implementations.
    """
    gen = torch.Generator().manual_seed(seed)
    out_std = 2.0 / math.sqrt(config.hidden_size)
    tensors = {}
    for name, shape in sorted(hf_tensor_shapes(config).items()):
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "lm_head.weight" or (name == "model.embed_tokens.weight"
                                          and config.tie_word_embeddings):
            t = out_std * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        tensors[name] = t.contiguous()
    return tensors


def build_tokenizer(vocab_size: int, seed: int, corpus: Iterable[str] | None = None) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` ids, trained on `corpus` (default: a
    seeded synthetic one)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if corpus is None:
        corpus = _corpus(seed, num_words=vocab_size)
    tok.train_from_iterator(corpus, trainer)
    short = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if short > 0:
        # Every id the model can emit must decode, so fill the gap with plain tokens.
        tok.add_tokens([f"<extra_{i}>" for i in range(short)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _corpus(seed: int, num_words: int) -> list[str]:
    """Pseudo-words from syllables, used with Zipf-like frequencies, plus some non-ASCII text."""
    rng = random.Random(seed)
    syllables = [c + v + e for c in "bcdfghjklmnprstvwz" for v in "aeiou" for e in ("", "n", "r", "s")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
             for _ in range(num_words)]
    cum, total = [], 0.0
    for rank in range(num_words):
        total += 1.0 / (rank + 1)
        cum.append(total)
    lines = [" ".join(rng.choices(words, cum_weights=cum, k=12)) for _ in range(4000)]
    lines.append(" ".join(words))          # every word at least once
    lines += ["The quick brown fox, 0123456789! héllo wörld ¿qué? 世界 🙂 (a) [b] {c} \"d\" 'e'\n"] * 20
    return lines


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
