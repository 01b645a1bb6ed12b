"""Round-to-nearest quantizers (training-free, at load time), producing canonical weights."""
from __future__ import annotations

import torch

from .format import QMAX, QuantizedWeight
from .hadamard import rotate


def _prep(w: torch.Tensor, hadamard: bool) -> torch.Tensor:
    w = w.float()
    return rotate(w) if hadamard else w


def int8_per_channel(w: torch.Tensor, hadamard: bool = False) -> QuantizedWeight:
    w = _prep(w, hadamard)
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-10)
    codes = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(codes, scale, bits=8, group_size=-1, hadamard=hadamard)


def fp8_per_channel(w: torch.Tensor) -> QuantizedWeight:
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / QMAX["fp8"]).clamp(min=1e-12)
    codes = (w / scale).clamp(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)
    return QuantizedWeight(codes, scale, bits=8, group_size=-1)


def int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
         hadamard: bool = False) -> QuantizedWeight:
    """int4 codes in [-8, 7]; groups of `group_size` along K (-1: one group per row).
    Symmetric: scale = max|w| / 7. Asymmetric: scale = (max - min) / 15 and an int zero point
    in [-8, 7], w ~= (codes - zero) * scale (compressed-tensors' convention)."""
    w = _prep(w, hadamard)
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"in-features {k} is not a multiple of group_size {g}")
    wg = w.view(n, k // g, g)
    if symmetric:
        scale = (wg.abs().amax(dim=2) / 7).clamp(min=1e-10)
        codes = torch.round(wg / scale[..., None]).clamp(-8, 7)
        zero = None
    else:
        lo = wg.amin(dim=2).clamp(max=0)
        hi = wg.amax(dim=2).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        zero = (torch.round(-lo / scale) - 8).clamp(-8, 7)
        codes = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(-8, 7)
        zero = zero.to(torch.int8)
    return QuantizedWeight(codes.view(n, k).to(torch.int8), scale, bits=4,
                           group_size=group_size, zero=zero, hadamard=hadamard)
