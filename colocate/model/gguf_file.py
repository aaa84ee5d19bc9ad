"""A GGUF file (llama.cpp's format) opened through the `gguf` package: header, config, tensors.

GGUF holds everything in one file: key/value metadata (the model shape, the tokenizer,
the chat template) and the tensors, each with its ggml type (F32, Q4_1, ...). Opening
memory-maps the file and parses only the header, so `colocate plan` can size a model
without reading its tensor data.

Shapes: GGUF lists dimensions fastest first (ne0 = in_features for a linear), the
reverse of torch's (out_features, in_features); `TensorInfo.shape` is torch order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURE = "llama"


def check_model_file(path: Path) -> None:
    """A `path:` that is a file must be a GGUF; say what is accepted otherwise."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); a "
                         "model path is an HF checkpoint directory (config.json + safetensors) "
                         "or a .gguf file")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str                 # ggml type: "F32", "Q4_1", "Q8_0", ...
    shape: tuple[int, ...]         # torch order: (out_features, in_features) for a linear
    data: np.ndarray               # memory-mapped raw data (uint8 blocks for quantized types)


def open_gguf(path: str | Path) -> "GGUFFile":
    """The GGUFFile of `path`, parsed once per process while the file is unchanged."""
    p = Path(path).resolve()
    st = p.stat() if p.is_file() else None
    return _open_cached(p, None if st is None else (st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=4)
def _open_cached(path: Path, stamp: tuple[int, int] | None) -> "GGUFFile":
    return GGUFFile(path)


class GGUFFile:
    """One opened GGUF file: `metadata` (key -> Python value) and `tensors` (name -> info)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        check_model_file(self.path)

        class _CheckedReader(GGUFReader):
            # GGUFReader builds a view of every tensor while opening; on a truncated file
            # that fails with a bare numpy error. Check each tensor's extent first so the
            # error names the file and the tensor.
            def _build_tensors(reader, start_offs, fields):   # noqa: N805
                _check_extents(self.path, len(reader.data), start_offs, fields)
                super()._build_tensors(start_offs, fields)

            # GGUFReader slices its np.memmap once per value (about 750k times for a
            # 49k-token vocabulary); memmap's subclass hooks made that 6 s. The same
            # slices of a plain ndarray view of the same mapping take a fraction of it.
            def _get(reader, offset, dtype, count=1, override_order=None):  # noqa: N805
                plain = reader.__dict__.get("_plain")
                if plain is None:
                    plain = reader._plain = reader.data.view(np.ndarray)
                dt = np.dtype(dtype)
                count = int(count)
                arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
                order = reader.byte_order if override_order is None else override_order
                return arr.view(arr.dtype.newbyteorder(order))

        try:
            reader = _CheckedReader(str(self.path))
        except ValueError as e:
            if str(e).startswith(str(self.path)):
                raise
            raise ValueError(f"{self.path}: cannot read the GGUF header: {e}") from None
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                self.metadata[key] = field.contents()
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                               t.data)
            for t in reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise ValueError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]

    def architecture(self) -> str:
        arch = self.require("general.architecture")
        if arch != SUPPORTED_ARCHITECTURE:
            raise ValueError(f"{self.path}: general.architecture={arch!r} is not supported; "
                             f"expected {SUPPORTED_ARCHITECTURE!r}")
        return arch


def _check_extents(path: Path, file_size: int, start: int, fields) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        tname = bytes(name).decode("utf-8", "replace")
        try:
            ggml_type = GGMLQuantizationType(int(raw_type[0]))
        except ValueError:
            raise ValueError(f"{path}: tensor {tname!r} has unknown ggml type "
                             f"{int(raw_type[0])}") from None
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        end = start + int(offset[0]) + int(np.prod(dims)) * type_size // block
        if end > file_size:
            raise ValueError(f"{path}: truncated: tensor {tname!r} ends at byte {end:,} but the "
                             f"file has {file_size:,} bytes")


def llama_config_dict(f: GGUFFile) -> dict[str, Any]:
    """The HF config.json that this GGUF's metadata describes (LlamaConfig.from_dict reads it)."""
    arch = f.architecture()

    def key(name: str, default: Any = ...) -> Any:
        return f.require(f"{arch}.{name}") if default is ... else f.get(f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError(f"{f.path}: tensor 'token_embd.weight' is missing")
    vocab = int(key("vocab_size", embed.shape[0]))
    d: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        # llama.cpp writes no output.weight when the lm_head is the embedding.
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": f.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "gguf_file": str(f.path),
    }
    scaling = key("rope.scaling.type", None)
    if scaling == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"{f.path}: {arch}.rope.scaling.type={scaling!r} is not supported; "
                         "expected none or 'linear'")
    return d
