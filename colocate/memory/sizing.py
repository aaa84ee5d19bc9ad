"""How many bytes a model and a service need, from config.json alone.

Pure arithmetic, no device and no torch: `colocate plan` sizes a 13B deployment on a
laptop. The MemoryArbiter adds these figures up per device; this module only says what
each one is. Where a figure is an estimate rather than exact storage, it says so.
"""
from __future__ import annotations

from dataclasses import dataclass

from colocate.config import ModelSpec, ServiceSpec
from colocate.engine.block_pool import KV_BLOCK_SIZE
from colocate.model.model_config import DTYPE_BYTES, LlamaConfig
from colocate.sizes import cdiv

# The KV pool is carved into whole blocks of KV_BLOCK_SIZE tokens, so a byte budget
# buys a whole number of blocks.

# int8 KV stores one scale per token, per KV head, per layer, for K and for V.
# fp32 rather than fp16: the scale is 3% of a 128-wide head either way, and fp32 keeps
# dequantization exact for outlier tokens. The KV quantizer must use the same width.
KV_INT8_SCALE_BYTES = 4

# Weight-only quantization stores scales (int8: one per output channel; int4: a scale
# and a zero point per group of in_features) in the model's dtype: 2 bytes for an fp16
# checkpoint, as the fused int4/int8 matmuls expect.

# Per-process runtime overhead. ESTIMATES, not measurements: a CUDA context with
# cuBLAS handles costs roughly 300-600 MiB depending on driver and GPU, so we reserve
# 500 MiB per process that touches the GPU; on CPU a Python process with torch
# imported holds roughly 200-300 MiB of its own. The probe measures the real figure
# once the service runs.
RUNTIME_OVERHEAD_CUDA = 500 * 2**20
RUNTIME_OVERHEAD_CPU = 256 * 2**20


def runtime_overhead(is_cuda: bool) -> int:
    return RUNTIME_OVERHEAD_CUDA if is_cuda else RUNTIME_OVERHEAD_CPU


def _cpu_int4_layout() -> str:
    from colocate.quant.cpu_ops import int4_layout

    return int4_layout()


@dataclass(frozen=True)
class ModelFootprint:
    """A model as it will sit in memory: its shape plus the dtype and quantization."""

    spec: ModelSpec
    shape: LlamaConfig

    @classmethod
    def of(cls, spec: ModelSpec) -> "ModelFootprint":
        return cls(spec=spec, shape=spec.llama_config())

    @property
    def dtype(self) -> str:
        """The dtype activations and unquantized tensors use ("auto" resolved)."""
        return self.shape.torch_dtype if self.spec.dtype == "auto" else self.spec.dtype

    @property
    def dtype_bytes(self) -> int:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"model {self.spec.name}: unsupported dtype {self.dtype!r}")
        return DTYPE_BYTES[self.dtype]

    @property
    def quantization(self) -> tuple[str | None, int | None]:
        """(method, group size) as the weights will sit: the spec's, or for a GGUF with
        quantization unset ("as stored") what its header says its linears hold."""
        q = self.spec.quantization
        if q == "none":
            return None, None
        if self.shape.gguf_file and q in (None, "gguf"):
            from colocate.quant.gguf_loading import stored_quantization

            return stored_quantization(self.shape, strict=q == "gguf")
        if q == "gguf":
            raise ValueError(f"model {self.spec.name}: quantization: gguf (keep the GGUF's "
                             "blocks) applies only to a .gguf checkpoint")
        return q, self.spec.quant_group_size if q == "int4" else None

    def describe(self) -> str:
        q, g = self.quantization
        label = self.dtype if q is None else (f"{q} g{g}" if g is not None else q)
        if self.shape.gguf_file and self.spec.quantization in (None, "gguf"):
            label += " (as stored)"
        return label

    def weight_bytes(self) -> int:
        """One copy of the weights.

        Embeddings, lm_head and norms stay in the model dtype under every scheme;
        only the decoder linears are quantized, and a GGUF as stored also keeps its
        tied Q8_0 embedding as the output head (q8_head_bytes).
        """
        return self.linear_bytes() + self.unquantized_bytes() + self.q8_head_bytes()

    def q8_head_bytes(self) -> int:
        """A GGUF kept as stored whose tied embedding is Q8_0 holds that as its output head
        too (on CPU; a CUDA load does not, so there this overestimates): one byte per
        weight and a float32 scale per 32."""
        s = self.shape
        if not (s.gguf_file and self.spec.quantization in (None, "gguf")
                and self.quantization[0] is not None):
            return 0
        from colocate.quant.gguf_loading import stored_q8_head

        n = s.vocab_size * s.hidden_size
        return n + n // 32 * 4 if stored_q8_head(s) else 0

    def unquantized_bytes(self) -> int:
        """Embeddings, lm_head (once if tied) and norms, in the model dtype."""
        s = self.shape
        return (s.embedding_parameters() + s.norm_parameters()) * self.dtype_bytes

    def linear_parameters(self) -> int:
        return self.shape.num_hidden_layers * sum(i * o for i, o in
                                                  self.shape.linear_shapes_per_layer())

    def linear_bytes(self) -> int:
        """Bytes of every decoder linear as stored: weights plus their scales / zeros."""
        s, b = self.shape, self.dtype_bytes
        shapes = s.linear_shapes_per_layer()
        q, g = self.quantization
        native = self.shape.gguf_file is not None and self.spec.quantization in (None, "gguf")
        if g is not None:
            for i, o in shapes:
                if i % g:
                    raise ValueError(f"model {self.spec.name}: quant_group_size={g} does not "
                                     f"divide a layer's input size {i} (a {i}x{o} linear)")
        if q is None:
            per_layer = sum(i * o for i, o in shapes) * b
        elif q == "int8" and g is not None:
            # GGUF Q8_0: 1 byte per weight + a float32 scale per group of 32.
            per_layer = sum(i * o + o * (i // g) * 4 for i, o in shapes)
        elif q == "int8":
            # 1 byte per weight + one scale per output channel.
            per_layer = sum(i * o + o * b for i, o in shapes)
        elif q == "int4":
            # Two weights per byte + a scale and a zero point per group of in_features
            # in each output row; a GGUF kept exact: float16 in the CPU kernels' blocks
            # layout, else float32 (torch's tinygemm op; on CUDA this overestimates).
            zb = (2 if _cpu_int4_layout() == "blocks" else 4) if native else b
            per_layer = sum(cdiv(i * o, 2) + o * cdiv(i, g) * 2 * zb
                            for i, o in shapes)
        else:
            raise ValueError(f"model {self.spec.name}: unknown quantization {q!r}")
        return s.num_hidden_layers * per_layer

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """K and V of one token across all layers, scales included."""
        s = self.shape
        if kv_dtype == "auto":
            return s.kv_bytes_per_token(self.dtype_bytes)
        if kv_dtype == "int8":
            scales = 2 * s.num_hidden_layers * s.num_key_value_heads * KV_INT8_SCALE_BYTES
            return s.kv_bytes_per_token(1) + scales
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}")

    def workspace_bytes(self, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """ESTIMATE of the activation memory of one forward step.

        Layers run one after another, so only one layer's temporaries are alive at a
        time. For T = max_num_batched_tokens tokens in the model dtype (b bytes), with
        h = hidden, f = intermediate, nh/nkv heads of width d:
            T * b * (2h            residual and normed hidden state
                     + (nh + 2 nkv) d    q, k, v
                     + nh d              attention output
                     + 3f)               gate, up and act(gate) * up
          + S * vocab * 4 * 2            fp32 logits and probabilities for the rows
                                         sampled, at most S = max_num_seqs per step
          + f * h * b                    when quantized: one dequantized weight of the
                                         largest linear, for kernels that unpack first
        Summing every term over-counts (not all are alive together); it is a ceiling,
        which is what an admission check wants. Attention scratch is left out: paged
        attention reads the cache in place.
        """
        s, b = self.shape, self.dtype_bytes
        h, f, d = s.hidden_size, s.intermediate_size, s.head_dim
        nh, nkv = s.num_attention_heads, s.num_key_value_heads
        per_token = 2 * h + (nh + 2 * nkv) * d + nh * d + 3 * f
        total = max_num_batched_tokens * b * per_token
        total += max_num_seqs * s.vocab_size * 4 * 2
        if self.quantization[0] is not None:
            total += max(i * o for i, o in s.linear_shapes_per_layer()) * b
        return total


@dataclass(frozen=True)
class ServiceDemand:
    """What one service asks of its device, apart from (possibly shared) weights."""

    service: str
    model: str
    kv_dtype: str                 # "auto" resolved to the model dtype, or "int8"
    kv_bytes_per_token: int
    kv_tokens: int                # whole blocks' worth of tokens the pool holds
    kv_bytes: int                 # charged to the ledger
    workspace_bytes: int
    runtime_bytes: int
    weight_bytes: int             # one copy of its model's weights

    @property
    def own_bytes(self) -> int:
        """Bytes that are this service's alone, whatever the weight sharing."""
        return self.kv_bytes + self.workspace_bytes + self.runtime_bytes


def kv_budget(footprint: ModelFootprint, service: ServiceSpec) -> tuple[int, int, int]:
    """(bytes per token, tokens, bytes) of a service's KV pool.

    A byte budget buys whole blocks: tokens are floored to a multiple of the block
    size, and the budget itself is charged (the pool may leave under one block unused).
    A token budget is rounded up to whole blocks and charged at their exact size.
    """
    per_token = footprint.kv_bytes_per_token(service.kv_cache.dtype)
    block_bytes = per_token * KV_BLOCK_SIZE
    if service.kv_cache.budget_bytes is not None:
        blocks = service.kv_cache.budget_bytes // block_bytes
        return per_token, blocks * KV_BLOCK_SIZE, service.kv_cache.budget_bytes
    blocks = cdiv(service.kv_cache.tokens, KV_BLOCK_SIZE)
    return per_token, blocks * KV_BLOCK_SIZE, blocks * block_bytes


def service_demand(service: ServiceSpec, footprint: ModelFootprint,
                   is_cuda: bool) -> ServiceDemand:
    per_token, tokens, kv_bytes = kv_budget(footprint, service)
    kv_dtype = footprint.dtype if service.kv_cache.dtype == "auto" else service.kv_cache.dtype
    return ServiceDemand(
        service=service.name, model=service.model, kv_dtype=kv_dtype,
        kv_bytes_per_token=per_token, kv_tokens=tokens, kv_bytes=kv_bytes,
        workspace_bytes=footprint.workspace_bytes(service.max_num_batched_tokens,
                                                  service.max_num_seqs),
        runtime_bytes=runtime_overhead(is_cuda),
        weight_bytes=footprint.weight_bytes(),
    )
