"""Rotary position embedding (RoPE) in HF's rotate-half layout.

HF checkpoints store q_proj / k_proj with the two halves of each head's dimensions
paired (i with i + head_dim/2), not interleaved, so the rotation here is
`x * cos + rotate_half(x) * sin` exactly as HF computes it.

cos and sin depend only on the position, so one table of max_position_embeddings rows
is built once and each step gathers its rows by `positions`; the gather happens once
per forward and is shared by every layer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from colocate.model.model_config import LlamaConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: LlamaConfig) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict) from the config, old (`rope_scaling`) or new (`rope_parameters`) style.

    transformers 5 writes `rope_parameters` holding rope_theta and the scaling keys;
    older configs have a top-level rope_theta and an optional `rope_scaling`.
    """
    params = dict(config.raw.get("rope_parameters") or {})
    scaling = dict(config.rope_scaling or {})
    scaling.update({k: v for k, v in params.items() if k != "rope_theta"})
    theta = float(params.get("rope_theta", config.rope_theta))
    return theta, scaling


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in float32 after any context-extension scaling."""
    theta, scaling = rope_parameters(config)
    dim = config.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}")
    if rope_type == "linear":
        # Stretching positions by `factor` is the same as shrinking every frequency by it.
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scale(inv_freq, scaling, config.max_position_embeddings)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, s: dict[str, Any], max_pos: int) -> torch.Tensor:
    """Llama 3.1 scaling: slow the long wavelengths by `factor`, keep the short ones, blend between."""
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s.get("original_max_position_embeddings", max_pos))
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the cos / sin table; `lookup` gathers rows, `rotate` rotates q and k together."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("cos_sin", self._table(), persistent=False)

    def _table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(max_pos, 2, head_dim): row p holds cos and a sign-folded sin for position p.

        The sin half that multiplies x2 is negated so the rotation needs one roll
        instead of a slice, a negation and a cat: rotate_half(x) * sin == roll(x) * sin_signed.
        """
        inv_freq = rope_inv_freq(self.config).to(device)
        pos = torch.arange(self.config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]                  # (P, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.stack([torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)], dim=1)

    def rebuild(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Recompute the table on a real device (after a meta-device build), then cast.

        The table is computed in float32 and cast, as HF does, so bf16 / fp16 models
        round cos / sin the same way.
        """
        self.cos_sin = self._table(device).to(dtype)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) positions -> (T, 2, 1, hd) cos / sin rows ready to broadcast over heads."""
        return self.cos_sin.index_select(0, positions).unsqueeze(2)

    @staticmethod
    def rotate(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (T, heads, hd) by the looked-up rows; q and k heads go through in one call."""
        half = x.shape[-1] // 2
        cos, sin = cos_sin[:, 0], cos_sin[:, 1]                     # (T, 1, hd) each
        return torch.addcmul(x * cos, x.roll(half, dims=-1), sin)
