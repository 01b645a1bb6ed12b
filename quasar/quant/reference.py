"""Reference GEMM arithmetic shared by the schemes (each scheme's `reference_gemm` is built from
these): plain torch, any device. Batch invariance as in quasar.ops.reference: chunks of up to
INVARIANT_ROWS rows are computed row by row, through the call a one-row step makes."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from quasar.ops.reference import INVARIANT_ROWS, quantize_per_token
from quasar.ops.types import QMAX, QActivation, QuantizedWeight
from .scheme import rotated


def dense_once(w: QuantizedWeight) -> QuantizedWeight:
    """Weight-only schemes' reference kernel: a copy of the weight that caches its fp32 matrix."""
    w = replace(w)
    w._dense = w.dequantize()
    return w


def codes_once(w: QuantizedWeight) -> QuantizedWeight:
    """Integer-activation schemes' reference kernel: a copy that caches its codes in fp32 (exact)."""
    w = replace(w)
    w._codes_f32 = w.codes.float()
    return w


def by_row(fn, x: torch.Tensor) -> torch.Tensor:
    if 1 < x.shape[0] <= INVARIANT_ROWS:
        return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
    return fn(x)


def finish(acc: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.to(acc.dtype)
    return acc.to(dtype)


def as_activation(x, qtype: str, w: QuantizedWeight) -> QActivation:
    if isinstance(x, QActivation):
        if x.qtype != qtype:
            raise ValueError(f"activation quantized as {x.qtype}, the GEMM needs {qtype}")
        return x
    return quantize_per_token(rotated(x, w), qtype)


def weight_only(x: torch.Tensor, w: QuantizedWeight, bias) -> torch.Tensor:
    """Dequantized weights (fp32) times activations in the model dtype; fp32 accumulation."""
    x = rotated(x, w)
    dense = w.dense_f32()
    acc = by_row(lambda r: r.float() @ dense.T, x)
    return finish(acc, bias, x.dtype)


def int_gemm(a: QActivation, w: QuantizedWeight, bias) -> torch.Tensor:
    """Exact int32 accumulation, then the per-token x per-channel rescale in fp32.

    Computed in fp32 over K-chunks small enough that every partial sum is an integer below 2^24
    (exact in fp32), summed in fp64: the same integers an int32 accumulator holds."""
    codes = w.__dict__.get("_codes_f32")
    if codes is None:
        codes = w.codes.float()
    q = a.q.float()
    k = q.shape[1]
    bound = QMAX[a.qtype] + 1
    chunk = max(1, (1 << 24) // (bound * 128))
    if k <= chunk:
        acc = q @ codes.T
    else:
        acc = sum((q[:, i:i + chunk] @ codes[:, i:i + chunk].T).double() for i in range(0, k, chunk)).float()
    return finish(acc * a.scale * w.scale.view(1, -1).float(), bias, a.dtype)
