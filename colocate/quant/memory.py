"""What a loaded model's weights hold in memory, quantized or not.

Counts the tensors actually kept (the state dict: parameters and persistent buffers,
each storage once, so tied embeddings count once), not a formula, so `colocate plan`'s
estimate (memory/sizing.py) can be checked against it. LlamaForCausalLM.weight_bytes()
counts parameters only and so misses the quantized linears, which are buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from colocate.quant.linear import _WeightOnlyLinear


@dataclass(frozen=True)
class LinearBytes:
    name: str
    kind: str                 # "float", "int8" or "int4"
    parameters: int           # in_features * out_features
    bytes: int                # every tensor of the layer: integers, scales, zeros, bias

    @property
    def bytes_per_parameter(self) -> float:
        return self.bytes / self.parameters


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        # Tied tensors share storage: count each (storage, offset, size) once.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def linear_bytes(model: nn.Module) -> list[LinearBytes]:
    """One entry per linear layer (quantized or float), in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _WeightOnlyLinear):
            kind = type(m).__name__.removesuffix("Linear").lower()
            out.append(LinearBytes(name, kind, m.in_features * m.out_features,
                                   _tensor_bytes(m.state_dict().values())))
        elif isinstance(m, nn.Linear):
            out.append(LinearBytes(name, "float", m.in_features * m.out_features,
                                   _tensor_bytes(m.state_dict().values())))
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: linears, embeddings, norms, lm_head."""
    return _tensor_bytes(model.state_dict().values())
