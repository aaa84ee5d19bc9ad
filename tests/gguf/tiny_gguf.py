"""Small GGUF files written with the `gguf` package's own writer, for bad-input tests:
a 2-layer llama whose linears are of a chosen ggml type, and variations that break it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 64, 128, 4, 2, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the byte-level BPE base vocabulary)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


TOKENS = SPECIALS + _byte_alphabet()
VOCAB = len(TOKENS)


def _tensor(writer: GGUFWriter, name: str, w: np.ndarray, kind: str) -> None:
    if kind == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    else:
        qt = GGMLQuantizationType[kind]
        writer.add_tensor(name, quantize(w.astype(np.float32), qt), raw_dtype=qt)


def write_tiny_gguf(path: Path, linear_type: str = "Q4_1", arch: str = "llama",
                    odd_type: tuple[str, str] | None = None,
                    wrong_shape: str | None = None) -> Path:
    """odd_type (tensor, ggml type) gives one tensor another type; wrong_shape names a
    tensor written with one output row too many."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * 256)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    hd = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for n in range(LAYERS):
        shapes.update({f"blk.{n}.attn_q.weight": (HIDDEN, HIDDEN),
                       f"blk.{n}.attn_k.weight": (KV_HEADS * hd, HIDDEN),
                       f"blk.{n}.attn_v.weight": (KV_HEADS * hd, HIDDEN),
                       f"blk.{n}.attn_output.weight": (HIDDEN, HIDDEN),
                       f"blk.{n}.ffn_gate.weight": (FFN, HIDDEN),
                       f"blk.{n}.ffn_up.weight": (FFN, HIDDEN),
                       f"blk.{n}.ffn_down.weight": (HIDDEN, FFN),
                       f"blk.{n}.attn_norm.weight": (HIDDEN,),
                       f"blk.{n}.ffn_norm.weight": (HIDDEN,)})
    for name, shape in shapes.items():
        if name == wrong_shape:
            shape = (shape[0] + 32, *shape[1:])
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 1:
            _tensor(writer, name, 1 + w, "F32")
            continue
        kind = linear_type if name.startswith("blk.") else "F32"
        if odd_type is not None and name == odd_type[0]:
            kind = odd_type[1]
        _tensor(writer, name, w, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
