"""Round-to-nearest quantization of float weights (no calibration data).

int8: symmetric, one scale per output channel, scale = max|w| / 127.
int4: asymmetric per group of `group_size` input channels. The range is widened to
include 0 (as GPTQ's quantizer does) so the integer zero point lands in [0, 15] and
no weight is clipped: every weight is within scale / 2 of its dequantized value.

Scales are rounded to `scale_dtype` (the dtype they are stored in) BEFORE the
integers are computed, so the stored pair (q, scale) is the best fit for the scale
that is actually kept, not for a scale that storage later perturbs.
"""
from __future__ import annotations

import torch

from colocate.quant.qtensors import Int4Weight, Int8Weight


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """All-zero rows or groups get scale 1 (their integers are 0 either way)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> Int8Weight:
    """(N, K) float -> per-channel int8."""
    wf = w.float()
    scale = _nonzero(wf.abs().amax(dim=1) / 127).to(scale_dtype)          # (N,)
    q = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127)          # (N, K)
    return Int8Weight(q=q.to(torch.int8), scale=scale)


def quantize_int4(w: torch.Tensor, group_size: int,
                  scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
    """(N, K) float -> grouped asymmetric int4; ValueError if group_size does not divide K."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"quant_group_size={group_size} does not divide the layer's input "
                         f"size {K}")
    wg = w.float().view(N, K // group_size, group_size)                     # (N, G, g)
    lo = wg.amin(dim=2).clamp(max=0)                                         # (N, G)
    hi = wg.amax(dim=2).clamp(min=0)
    scale = _nonzero((hi - lo) / 15).to(scale_dtype)
    s = scale.float()
    zero = torch.round(-lo / s).clamp_(0, 15)                                # (N, G)
    q = (torch.round(wg / s[..., None]) + zero[..., None]).clamp_(0, 15)     # (N, G, g)
    return Int4Weight(q=q.view(N, K).to(torch.uint8), scale=scale, zero=zero,
                      group_size=group_size)
