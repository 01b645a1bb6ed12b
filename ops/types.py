"""Canonical in-memory formats shared by every scheme and backend (part of the op contract).

`QuantizedWeight` is what RTN produces and what a compressed-tensors checkpoint unpacks to; each
backend repacks it once (`Backend.prepare_weight`) into its own kernel layout. `QActivation` is a
per-token quantized activation, the output of `quantize_per_token` / the fused norm+quant ops.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

QMAX = {"int8": 127, "int4": 7, "fp8": 448.0}


@dataclass
class QuantizedWeight:
    """codes[N, K]: int8 holding int8 codes, or int4 codes in [-8, 7] (one per element), or
    float8_e4m3fn codes. scale[N, G] fp32 with G = K / group_size groups (G = 1: per output
    channel). zero[N, G] int8 (asymmetric int4; None = symmetric): w ~= (codes - zero) * scale.
    hadamard: the weight is W @ H (H a block Hadamard rotation over K), so x must be rotated
    online (x @ H) before the product."""
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int = -1
    zero: Optional[torch.Tensor] = None
    hadamard: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def is_fp8(self) -> bool:
        return self.codes.dtype == torch.float8_e4m3fn

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.codes.shape
        c = self.codes.to(torch.float64 if dtype == torch.float64 else torch.float32)
        g = self.scale.shape[1]
        c = c.view(n, g, -1)
        if self.zero is not None:
            c = c - self.zero.to(c.dtype).view(n, g, 1)
        w = (c * self.scale.to(c.dtype).view(n, g, 1)).view(n, k)
        return w.to(dtype)

    def dense_f32(self) -> torch.Tensor:
        """The fp32 dequantized matrix; cached when a backend prepared it once (the CPU does)."""
        cached = self.__dict__.get("_dense")
        return cached if cached is not None else self.dequantize(torch.float32)

    def to(self, device) -> "QuantizedWeight":
        return replace(self, codes=self.codes.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Concatenate along N (fused QKV / gate-up at load time)."""
        p0 = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.hadamard, p.zero is None, p.codes.dtype) != (
                    p0.bits, p0.group_size, p0.hadamard, p0.zero is None, p0.codes.dtype):
                raise ValueError("cannot fuse linears quantized with different formats")
        return replace(p0, codes=torch.cat([p.codes for p in parts]),
                       scale=torch.cat([p.scale for p in parts]),
                       zero=None if p0.zero is None else torch.cat([p.zero for p in parts]))


@dataclass
class QActivation:
    """Per-token symmetric quantized activation: x ~= q * scale. q[M, K] is int8 (int8 or int4
    codes) or float8_e4m3fn; scale[M, 1] fp32; dtype is the activation dtype it came from (and
    the GEMM's output dtype)."""
    q: torch.Tensor
    scale: torch.Tensor
    qtype: str
    dtype: torch.dtype

    @property
    def shape(self):
        return self.q.shape
