"""Weight-only quantized replacements for nn.Linear.

Their state is registered as buffers, never parameters: plain tensors the weight store
can lay out in its flat buffer and a service can map read-only. Bias, when present, is
a buffer too, in the model dtype.

forward() picks the matmul by device and layout:
    CPU  int8: the block-dot kernel, else torch's _weight_int8pack_mm; int4 "blocks": the
         block-dot kernel; int4 "tinygemm": _weight_int4pack_mm_for_cpu
         (cpu_ops.py has the measurements behind this choice)
    CUDA int8: kernels/w8a16_matmul.py;      int4 ("kn"): kernels/w4a16_matmul.py
    int4 "kn" on CPU (a layout built for CUDA, inspected on the host): dequantize + F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colocate.quant import cpu_ops, int4_layouts, row_tiles
from colocate.quant.qtensors import Int4Weight, Int8Weight


class _WeightOnlyLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)                                 # (M, K)
        out = self._matmul(x2)                                               # (M, N)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float32 weight this module multiplies by, in input-channel order."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Int8Linear(_WeightOnlyLinear):
    """qweight (N, K) int8 and scale (N,) in the model dtype; with group_size (GGUF Q8_0,
    32) scale is (N, K / g) in float32, so fp16 scales stay exact (on CPU the block-dot
    kernel takes them as they are; elsewhere the matmul runs on the dequantized weight).

    layout (row_tiles.INT8_LAYOUTS): "rows", qweight as torch's ops and CUDA read it, or
    "x16", qweight and scale in the CPU block-dot kernels' tile order; a shape the tiles
    do not fit (out_features not a multiple of 16, in_features of 32) stays in rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, group_size: int | None = None,
                 layout: str = "rows"):
        super().__init__(in_features, out_features, bias, dtype)
        if group_size is not None and in_features % group_size:
            raise ValueError(f"int8 group size {group_size} does not divide the layer's "
                             f"input size {in_features}")
        self.group_size = group_size
        self.layout = self.layout_for(layout, out_features, in_features)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype) if group_size is None
                             else torch.empty(out_features, in_features // group_size))

    @staticmethod
    def layout_for(wanted: str, N: int, K: int) -> str:
        if wanted not in row_tiles.INT8_LAYOUTS:
            raise ValueError(f"int8 layout {wanted!r}: expected one of "
                             f"{list(row_tiles.INT8_LAYOUTS)}")
        return "x16" if wanted == "x16" and row_tiles.fits(N, K) else "rows"

    @classmethod
    def buffers_for(cls, w: Int8Weight, dtype: torch.dtype,
                    layout: str = "rows") -> dict[str, torch.Tensor]:
        scale = w.scale.to(dtype) if w.group_size is None else w.scale.float().contiguous()
        q = w.q.contiguous()
        if cls.layout_for(layout, *q.shape) == "x16":
            q = row_tiles.pack_int8(q)
            scale = row_tiles.tiled(scale.reshape(q.shape[0], -1)).reshape(scale.shape)
        return {"qweight": q, "scale": scale.contiguous()}

    def _row_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout == "rows":
            return self.qweight, self.scale
        scale = row_tiles.untiled(self.scale.reshape(self.out_features, -1))
        return row_tiles.unpack_int8(self.qweight), scale.reshape(self.scale.shape)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "x16":
            return cpu_ops.int8_x16_mm(x, self.qweight, self.scale)
        if not x.is_cuda:
            return cpu_ops.int8_mm(x, self.qweight, self.scale)
        if self.group_size is not None:
            return F.linear(x, self.dequantize().to(x.dtype))
        from colocate.kernels.w8a16_matmul import w8a16_matmul

        return w8a16_matmul(x.contiguous(), self.qweight, self.scale)

    def dequantize(self) -> torch.Tensor:
        return Int8Weight(*self._row_order()).dequantize()


class Int4Linear(_WeightOnlyLinear):
    """Buffers of int4_layouts' `layout`, plus perm (K,) int64 under GPTQ act-order.

    exact_scales keeps the tinygemm scales in float32: a GGUF's fp16 scales and mins held
    exactly as stored, so dequantize() is llama.cpp's weight bit for bit. The CPU matmul
    still runs in bf16, as for every int4 weight (cpu_ops.int4_mm)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32, group_size: int = 128,
                 layout: str = "tinygemm", act_order: bool = False,
                 exact_scales: bool = False):
        super().__init__(in_features, out_features, bias, dtype)
        if in_features % group_size:
            raise ValueError(f"quant_group_size={group_size} does not divide the layer's "
                             f"input size {in_features}")
        self.group_size = group_size
        self.layout = layout
        for name, t in int4_layouts.EMPTY[layout](out_features, in_features, group_size,
                                                  dtype, exact_scales).items():
            self.register_buffer(name, t)
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.int64)
                             if act_order else None)

    @staticmethod
    def buffers_for(w: Int4Weight, dtype: torch.dtype, layout: str,
                    act_order: bool, exact_scales: bool = False) -> dict[str, torch.Tensor]:
        out = int4_layouts.PACK[layout](w, dtype, exact_scales)
        if act_order:
            out["perm"] = (w.perm if w.perm is not None
                           else torch.arange(w.q.shape[1])).to(torch.int64)
        return out

    def _packed(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in int4_layouts.BUFFER_NAMES[self.layout]}

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(1, self.perm)                                 # (M, K) perm order
        if self.layout == "blocks":
            return cpu_ops.int4_blocks_mm(x, self.qweight, self.scale, self.min,
                                          self.group_size)
        if self.layout == "tinygemm":
            return cpu_ops.int4_mm(x, self.qweight, self.scale_zero, self.group_size)
        if x.is_cuda:
            from colocate.kernels.w4a16_matmul import w4a16_matmul

            return w4a16_matmul(x.contiguous(), self.qweight, self.scale, self.zero,
                                self.group_size)
        return F.linear(x, self._dequantize_perm_order().to(x.dtype))

    def _dequantize_perm_order(self) -> torch.Tensor:
        return int4_layouts.dequantize(self.layout, self._packed(), self.group_size)

    def dequantize(self) -> torch.Tensor:
        w = self._dequantize_perm_order()                                    # (N, K)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}, "
                f"act_order={self.perm is not None}")
