"""Text <-> token ids through a checkpoint's tokenizer.json, and streaming detokenization."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

# Decoding half of a multi-byte character (or a lone byte-level piece) yields this.
_REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, eos_token_ids: tuple[int, ...],
                 bos_token_id: int | None = None):
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json in the model directory")
        gen, cfg = _read_json(path / "generation_config.json"), _read_json(path / "config.json")
        # generation_config.json is what HF's generate() honours, so it wins over config.json.
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        return cls(_HFTokenizer.from_file(str(file)), eos_ids, bos)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS (or whatever the post-processor adds) when add_special_tokens."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas, one push per token.

    A token may carry only part of a character (byte-level BPE splits UTF-8), and some
    decoders change a token's text depending on what precedes it (leading spaces).
    So each push decodes a short window: the tokens from `prefix_offset` on, compared
    with the text of the tokens already emitted from that window (`prefix_offset` to
    `read_offset`). The difference is new text, unless it ends in a replacement
    character, in which case it is held back until a later token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_ids)
        self.output_ids: list[int] = []
        # Keep a few prompt tokens as left context so the first output token decodes as it
        # would mid-text (e.g. keeps its leading space under SentencePiece decoders).
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - 5, 0)
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one output token; return the text it completes ("" if still incomplete)."""
        self.tokens.append(token_id)
        self.output_ids.append(token_id)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix_text = decode(self.tokens[self.prefix_offset:self.read_offset], skip)
        new_text = decode(self.tokens[self.prefix_offset:], skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        self.text += delta
        return delta


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)
