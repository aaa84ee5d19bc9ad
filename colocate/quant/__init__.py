"""Weight-only int8 / int4 quantization of the decoder linears.

    config.py        QuantConfig: method, group size, source, device layout
    qtensors.py      Int8Weight / Int4Weight: the unpacked logical form
    rtn.py           round-to-nearest quantization of float weights
    int4_layouts.py  how int4 sits in memory for the CPU op ("tinygemm") and Triton ("kn")
    cpu_ops.py       torch's packed CPU matmuls, with the measurements that chose them
    linear.py        Int8Linear / Int4Linear modules (buffers only)
    handler.py       swap nn.Linear on meta; quantize a float state dict
    awq.py, gptq.py  unpack published AWQ / GPTQ checkpoints
    prequantized.py  read such a checkpoint into the model's state dict
    loading.py       the state dict and module structure a QuantConfig implies
    memory.py        bytes held per linear and in total
"""
from colocate.quant.config import QuantConfig
from colocate.quant.linear import Int4Linear, Int8Linear
from colocate.quant.memory import LinearBytes, linear_bytes, weight_bytes

__all__ = ["Int4Linear", "Int8Linear", "LinearBytes", "QuantConfig", "linear_bytes",
           "weight_bytes"]
