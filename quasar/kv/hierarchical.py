"""QuantSpec's hierarchical INT4/INT8 codes (Tiwari et al., ICML 2025; `rishabh-16/QuantSpec`):
the reference quantizer that the KV representation and its kernels are checked against.

Every group of values is quantized asymmetrically in two levels:

    scale = (max - min) / 15
    upper u = clamp(round((x - min) / scale), 0, 15)                       4 bits: the draft's view
    lower l = clamp(round((x - (u * scale + min)) / (scale / 16)), -8, 7)  4 more bits, stored l + 8

    draft    x4 = u * scale + min                          |x - x4| <= scale / 2
    verifier x8 = u * scale + l * scale / 16 + min         |x - x8| <= scale / 16 (scale / 32 unless l clamps)

Upper and lower codes are kept in separate planes (two uint8 tensors of nibbles here; the
kernels pack two codes per byte), so a reader of the draft's view touches the upper plane only.
A constant group (max == min) has scale 0; its codes are 0 and both views give `min` exactly.

Group axes (QuantSpec's): keys per channel over G consecutive tokens, values per token over G
consecutive channels. `quantize(x, dim)` takes the group along `dim` (x's extent along `dim` is
one group).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Codes(NamedTuple):
    upper: torch.Tensor      # uint8 in [0, 15]
    lower: torch.Tensor      # uint8 in [0, 15]  (the signed residual + 8)
    scale: torch.Tensor      # per group (x's dtype; the group dim kept with extent 1)
    minimum: torch.Tensor


def quantize(x: torch.Tensor, dim: int) -> Codes:
    """Two-level codes of x, one group per slice along `dim` (computed in float32)."""
    xf = x.float()
    mn = xf.amin(dim, keepdim=True)
    mx = xf.amax(dim, keepdim=True)
    scale = (mx - mn) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = torch.clamp(torch.round((xf - mn) / safe), 0, 15)
    u = torch.where(scale > 0, u, torch.zeros_like(u))
    resid = xf - (u * scale + mn)
    low = torch.clamp(torch.round(resid / (safe / 16)), -8, 7)
    low = torch.where(scale > 0, low, torch.zeros_like(low))
    return Codes(u.to(torch.uint8), (low + 8).to(torch.uint8), scale.to(x.dtype), mn.to(x.dtype))


def dequantize_upper(c: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The draft's view: upper plane only."""
    return (c.upper.float() * c.scale.float() + c.minimum.float()).to(dtype)


def dequantize(c: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The verifier's view: both planes (about 8 bits)."""
    s = c.scale.float()
    return (c.upper.float() * s + (c.lower.float() - 8) * (s / 16) + c.minimum.float()).to(dtype)
