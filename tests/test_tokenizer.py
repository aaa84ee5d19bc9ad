"""Tokenizer over tokenizer.json, and streaming detokenization that never splits a character."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from colocate.model.tiny import write_tiny_checkpoint
from colocate.engine.detokenizer import IncrementalDetokenizer
from colocate.model.tokenizer import Tokenizer

TEXTS = [
    "hello world",
    "  leading spaces, trailing space ",
    "héllo 世界 🙂",
    "日本語のテキスト 💡🚀 Ωμέγα ñandú\nnew line\ttab",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), preset="tiny")


@pytest.fixture(scope="module")
def tok(ckpt) -> Tokenizer:
    return Tokenizer.from_pretrained(ckpt)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_adds_bos(tok, text):
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]


def test_vocab_and_every_id_decodes(tok):
    assert tok.vocab_size == 2048
    for i in range(tok.vocab_size):
        assert isinstance(tok.decode([i], skip_special_tokens=False), str)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_concatenate_to_full_decode(tok, text):
    out_ids = tok.encode(text, add_special_tokens=False) + [2]       # ends with </s>
    detok = IncrementalDetokenizer(tok, tok.encode("The prompt:"))
    deltas = [detok.push(t) for t in out_ids]
    assert "".join(deltas) == detok.text == tok.decode(out_ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_holds_back_partial_characters(tok):
    # Byte-level BPE has no merge for these rare characters, so each is several tokens
    # and the first of them alone is not valid UTF-8.
    text = "💡🚀"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tok, [1])
    deltas = [detok.push(t) for t in ids]
    assert deltas[0] == ""
    assert [d for d in deltas if d] == ["💡", "🚀"]


def test_eos_ids_from_generation_config(ckpt, tmp_path):
    assert Tokenizer.from_pretrained(ckpt).eos_token_ids == (2,)

    listed = tmp_path / "listed"
    shutil.copytree(ckpt, listed)
    (listed / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_pretrained(listed).eos_token_ids == (2, 7)

    # Without generation_config.json, config.json's eos_token_id is used.
    fallback = tmp_path / "fallback"
    shutil.copytree(ckpt, fallback)
    (fallback / "generation_config.json").unlink()
    cfg = json.loads((fallback / "config.json").read_text())
    (fallback / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 9}))
    assert Tokenizer.from_pretrained(fallback).eos_token_ids == (9,)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
