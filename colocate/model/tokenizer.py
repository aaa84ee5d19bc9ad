"""Text <-> token ids through a checkpoint's tokenizer.json, and streaming detokenization."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from colocate.model.chat_template import ChatTemplate, NoChatTemplateError
from colocate.sampling_params import SamplingParams

# Decoding half of a multi-byte character (or a lone byte-level piece) yields this.


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, eos_token_ids: tuple[int, ...],
                 bos_token_id: int | None = None, chat_template: ChatTemplate | None = None):
        self.backend = backend
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """From a checkpoint directory (tokenizer.json) or a GGUF file (its metadata)."""
        path = Path(path)
        if path.is_file():
            return cls.from_gguf(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer.json in the model directory")
        gen, cfg = _read_json(path / "generation_config.json"), _read_json(path / "config.json")
        # generation_config.json is what HF's generate() honours, so it wins over config.json.
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        return cls(_HFTokenizer.from_file(str(file)), eos_ids, bos, _hf_chat_template(path))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        from colocate.model.gguf_file import open_gguf
        from colocate.model.gguf_tokenizer import tokenizer_from_gguf

        f = open_gguf(path)
        backend = tokenizer_from_gguf(f)
        tokens = f.require("tokenizer.ggml.tokens")
        ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown",
                                                                     "padding", "eot")}
        template = f.get("tokenizer.chat_template")
        chat = None
        if template is not None:
            names = {"bos_token": ids["bos"], "eos_token": ids["eos"],
                     "unk_token": ids["unknown"], "pad_token": ids["padding"]}
            chat = ChatTemplate(template, {k: None if i is None else tokens[i]
                                           for k, i in names.items()},
                                origin=f"{path}: tokenizer.chat_template")
        eos = tuple(i for i in (ids["eos"], ids["eot"]) if i is not None)
        return cls(backend, tuple(dict.fromkeys(eos)), ids["bos"], chat)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; BOS (or whatever the post-processor adds) when add_special_tokens."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """One conversation -> prompt token ids, as HF's apply_chat_template(tokenize=True):
        the rendered text already holds the template's special tokens, so none are added."""
        if self.chat_template is None:
            raise NoChatTemplateError()
        text = self.chat_template.render(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def end_of_turn_ids(self) -> tuple[int, ...]:
        """EOS plus the chat template's end-of-turn token: where a chat reply stops."""
        eot = () if self.chat_template is None else self.chat_template.end_of_turn_tokens(
            self.backend.get_vocab(with_added_tokens=True))
        return tuple(dict.fromkeys(self.eos_token_ids + eot))

    def chat_params(self, params: SamplingParams) -> SamplingParams:
        """`params` for a chat reply: its stop token ids plus end_of_turn_ids()."""
        stops = list(dict.fromkeys(params.stop_token_ids + list(self.end_of_turn_ids())))
        return dataclasses.replace(params, stop_token_ids=stops)


def _hf_chat_template(path: Path) -> ChatTemplate | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or
    HF's list of named templates, of which "default" is the chat one)."""
    cfg = _read_json(path / "tokenizer_config.json")
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        source, origin = jinja.read_text(), str(jinja)
    else:
        source, origin = cfg.get("chat_template"), f"{path / 'tokenizer_config.json'}"
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None

    def token(v):                               # "<s>" or {"content": "<s>", ...}
        return v.get("content") if isinstance(v, dict) else v

    special = {k: token(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                              "pad_token")}
    return ChatTemplate(source, special, origin=origin)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path) as f:
        return json.load(f)

def load_tokenizer(path: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer (a GGUF always has one), or None when a checkpoint
    directory ships none (token-id prompts only)."""
    if path.is_file() or (path / "tokenizer.json").exists():
        return Tokenizer.from_pretrained(path)
    return None
