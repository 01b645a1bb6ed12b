"""Reference semantics of every op in the contract: plain torch, any device.

This module is the definition. The CPU backend registers these functions as they are; the CUDA
and NPU backends are tested against them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from quasar.quant.format import QMAX, QActivation, QuantizedWeight


# ------------------------------------------------------------------ norms, rope, activations

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


def quantize_per_token(x: torch.Tensor, qtype: str) -> QActivation:
    qmax = QMAX[qtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = (amax / qmax).clamp(min=1e-8)   # a zero row quantizes to zeros, not NaN
    if qtype == "fp8":
        q = (xf / scale).clamp(-qmax, qmax).to(torch.float8_e4m3fn)
    else:
        q = torch.round(xf / scale).clamp(-qmax - 1, qmax).to(torch.int8)
    return QActivation(q, scale, qtype, x.dtype)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, qtype: str) -> QActivation:
    return quantize_per_token(rms_norm(x, weight, eps), qtype)


def silu_mul_quant(x: torch.Tensor, qtype: str) -> QActivation:
    return quantize_per_token(silu_mul(x), qtype)


# ------------------------------------------------------------------ GEMMs, one per scheme

def _finish(acc: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        acc = acc + bias.to(acc.dtype)
    return acc.to(dtype)


def _rotate(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    if not w.hadamard:
        return x
    from quasar.quant.hadamard import rotate
    return rotate(x)


def _as_activation(x, qtype: str, w: QuantizedWeight) -> QActivation:
    if isinstance(x, QActivation):
        if x.qtype != qtype:
            raise ValueError(f"activation quantized as {x.qtype}, the GEMM needs {qtype}")
        return x
    return quantize_per_token(_rotate(x, w), qtype)


def gemm_bf16(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Unquantized: w[N, K] in the model dtype."""
    return F.linear(x, w, bias)


def _weight_only(x: torch.Tensor, w: QuantizedWeight, bias) -> torch.Tensor:
    x = _rotate(x, w)
    acc = x.float() @ w.dense_f32().T
    return _finish(acc, bias, x.dtype)


def gemm_w8a16(x, w: QuantizedWeight, bias=None):
    """int8 per-channel weights, activations in the model dtype; fp32 accumulation."""
    return _weight_only(x, w, bias)


def gemm_w4a16(x, w: QuantizedWeight, bias=None):
    """int4 weights (grouped or per-channel, sym or asym), activations in the model dtype."""
    return _weight_only(x, w, bias)


def _int_gemm(a: QActivation, w: QuantizedWeight, bias) -> torch.Tensor:
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
    return _finish(acc * a.scale * w.scale.view(1, -1).float(), bias, a.dtype)


def gemm_w8a8_int8(x, w: QuantizedWeight, bias=None):
    """int8 per-channel weights x per-token dynamic int8 activations, int32 accumulation."""
    return _int_gemm(_as_activation(x, "int8", w), w, bias)


def gemm_w4a4(x, w: QuantizedWeight, bias=None):
    """int4 per-channel weights x per-token dynamic int4 activations (QSpec's draft mode)."""
    return _int_gemm(_as_activation(x, "int4", w), w, bias)


def gemm_w8a8_fp8(x, w: QuantizedWeight, bias=None):
    """e4m3 per-channel weights x per-token dynamic e4m3 activations, fp32 accumulation."""
    a = _as_activation(x, "fp8", w)
    acc = a.q.float() @ w.codes.float().T
    return _finish(acc * a.scale * w.scale.view(1, -1).float(), bias, a.dtype)


# ------------------------------------------------------------------ KV cache and attention

def kv_write(cache, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    b = torch.arange(k.shape[0], device=k.device)[:, None]
    cache.k[layer][b, :, positions] = k.to(cache.dtype)
    cache.v[layer][b, :, positions] = v.to(cache.dtype)


def attention(q: torch.Tensor, cache, layer: int, positions: torch.Tensor, kv_len: int,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    k = cache.k[layer][:, :, :kv_len]
    v = cache.v[layer][:, :, :kv_len]
    heads, kv_heads = q.shape[2], k.shape[1]
    slots = torch.arange(kv_len, device=q.device)
    allow = slots[None, None, :] <= positions[:, :, None]          # [B, T, kv_len]
    if mask is not None:
        allow = allow & mask
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=allow[:, None],
        scale=q.shape[-1] ** -0.5, enable_gqa=heads != kv_heads)
    return out.transpose(1, 2)


REFERENCE_OPS = {
    "rms_norm": rms_norm, "rms_norm_quant": rms_norm_quant, "rope": rope,
    "quantize_per_token": quantize_per_token, "silu_mul": silu_mul, "silu_mul_quant": silu_mul_quant,
    "gemm_bf16": gemm_bf16, "gemm_w8a8_int8": gemm_w8a8_int8, "gemm_w8a8_fp8": gemm_w8a8_fp8,
    "gemm_w8a16": gemm_w8a16, "gemm_w4a16": gemm_w4a16, "gemm_w4a4": gemm_w4a4,
    "kv_write": kv_write, "attention": attention,
}
