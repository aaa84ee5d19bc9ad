"""A `tokenizers` tokenizer rebuilt from a GGUF's tokenizer.ggml.* metadata.

llama.cpp stores the vocabulary (tokens, token types, merges) and names the
pre-tokenizer (`tokenizer.ggml.pre`) instead of storing its regexes; the table below
gives, per name, the HF pre-tokenizer that splits text the same way (llama.cpp's
llama-vocab.cpp lists the regexes). Only byte-level BPE vocabularies (`gpt2`) are
rebuilt; a SentencePiece one (`llama`) is refused with the key named.
"""
from __future__ import annotations

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from colocate.model.gguf_file import GGUFFile

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
SPECIAL_TYPES = (3, 4)

def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _pre_tokenizer(name: str, path: str) -> pre_tokenizers.PreTokenizer:
    if name in ("gpt2", "default"):
        return _byte_level()
    if name in ("smollm", "starcoder", "refact"):
        # every digit its own piece, then GPT-2's split (llama.cpp: "\p{N}" first)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        _byte_level()])
    raise ValueError(f"{path}: tokenizer.ggml.pre={name!r} is not supported; expected one of "
                     "'gpt2', 'default', 'smollm', 'starcoder', 'refact'")


def tokenizer_from_gguf(f: GGUFFile) -> HFTokenizer:
    path = str(f.path)
    model = f.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model={model!r} is not supported; only "
                         "byte-level BPE ('gpt2') vocabularies are rebuilt")
    tokens = list(f.require("tokenizer.ggml.tokens"))
    types = list(f.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = _pre_tokenizer(f.get("tokenizer.ggml.pre", "gpt2"), path)
    backend.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole, before the BPE splits text.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types) if kind in SPECIAL_TYPES])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend

