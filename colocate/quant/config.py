"""QuantConfig: how a model's decoder linears are quantized, checked once, at load.

It travels with the weights: the weight store puts `to_dict()` in the WeightHandle so
a service rebuilds exactly the module structure the published buffer was laid out for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from colocate.quant import cpu_ops
from colocate.quant.row_tiles import INT8_LAYOUTS

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
# Where the integers came from: our round-to-nearest, or a published checkpoint.
SOURCES = ("rtn", "awq", "gptq", "gguf")
# int4 buffer layouts (int4_layouts.py). "blocks": blocks of 32 for the CPU block-dot
# kernel; "tinygemm": the packing torch's CPU int4 matmul reads, where that kernel is
# not available; "kn": nibbles packed along K, N contiguous, for the Triton kernel.
INT4_LAYOUTS = ("blocks", "tinygemm", "kn")


def _check_choice(what: str, value: Any, choices: tuple, expected: str = "one of ") -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r} is not supported; expected {expected}{list(choices)}")


@dataclass(frozen=True)
class QuantConfig:
    method: str                    # "int8" (per output channel) | "int4" (grouped, asymmetric)
    group_size: int | None = None  # int4 only: input features per scale / zero point
    source: str = "rtn"
    layout: str | None = None      # int4 only: one of INT4_LAYOUTS, chosen per device
    act_order: bool = False        # int4 GPTQ desc_act: every int4 linear permutes its input
    # GGUF kept as stored: int4 scales in float32 on CPU, int8 with a scale per group.
    exact_scales: bool = False
    # The output head as an int8 linear with a scale per group of 32: a GGUF's tied Q8_0
    # embedding kept as stored (CPU), which a decode step then reads at 1.1 bytes per
    # weight instead of the model dtype's (quant/gguf_loading.py).
    q8_lm_head: bool = False
    # Every int8 linear's layout (row_tiles.INT8_LAYOUTS), the output head's included:
    # "x16" for the CPU block-dot kernels, chosen per device like the int4 layout.
    int8_layout: str = "rows"

    def __post_init__(self) -> None:
        _check_choice("quantization", self.method, METHODS, "None or one of ")
        _check_choice("quantization source", self.source, SOURCES)
        _check_choice("int8 layout", self.int8_layout, INT8_LAYOUTS)
        if self.method == "int4":
            _check_choice("int4 quant_group_size", self.group_size, GROUP_SIZES)
            _check_choice("int4 layout", self.layout, INT4_LAYOUTS)
        elif self.source == "gguf":
            if self.group_size != 32:
                raise ValueError(f"GGUF Q8_0 int8 has groups of 32, not {self.group_size!r}")
        if self.q8_lm_head and self.source != "gguf":
            raise ValueError("an int8 output head is kept only from a GGUF's Q8_0 embedding")
        if self.method == "int4" or self.source == "gguf":
            return
        if self.group_size is not None or self.layout is not None or self.act_order:
            raise ValueError("int8 is per output channel: quant_group_size, layout and "
                             "act_order do not apply")

    @classmethod
    def for_device(cls, method: str | None, group_size: int | None, device: str,
                   source: str = "rtn", act_order: bool = False) -> "QuantConfig | None":
        """The config a model on `device` uses; None when `method` is None.

        `group_size` None means the default (128) for int4; int8 ignores it, since
        the YAML and LLM always carry a group size, whatever the method.
        """
        if method is None:
            return None
        cuda = str(device).startswith("cuda")
        int8_layout = "rows" if cuda else cpu_ops.int8_layout()
        if method != "int4":
            return (cls(method=method, int8_layout=int8_layout) if source != "gguf" else
                    cls(method=method, group_size=group_size, source=source, exact_scales=True,
                        int8_layout=int8_layout))
        return cls(method="int4", group_size=128 if group_size is None else group_size,
                   source=source, layout="kn" if cuda else cpu_ops.int4_layout(),
                   act_order=act_order, exact_scales=source == "gguf",
                   int8_layout=int8_layout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        return cls(**d)
