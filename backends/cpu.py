"""CPU backend: the reference implementation of every op (quasar.ops.reference), the definition
the other backends are tested against, and each scheme's reference GEMM (its "reference" kernel).
Used by CI, and by anyone without an accelerator."""
from __future__ import annotations

import torch

from quasar.ops import reference as R
from .base import Backend


class CpuBackend(Backend):
    name = "cpu"

    @classmethod
    def create(cls, options=None) -> "CpuBackend":
        return cls(torch.device("cpu"), options)

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def rms_norm(self, x, weight, eps):
        return R.rms_norm(x, weight, eps)

    def rms_norm_quant(self, x, weight, eps, qtype):
        return R.rms_norm_quant(x, weight, eps, qtype)

    def add_rms_norm(self, x, delta, weight, eps, qtype=None):
        return R.add_rms_norm(x, delta, weight, eps, qtype)

    def rope(self, x, cos, sin):
        return R.rope(x, cos, sin)

    def quantize_per_token(self, x, qtype):
        return R.quantize_per_token(x, qtype)

    def silu_mul(self, x):
        return R.silu_mul(x)

    def silu_mul_quant(self, x, qtype):
        return R.silu_mul_quant(x, qtype)

    def kv_write(self, cache, layer, k, v, positions):
        return R.kv_write(cache, layer, k, v, positions)

    def rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer):
        return R.rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, positions, cache, layer)

    def attention(self, q, cache, layer, positions, kv_len, mask=None):
        return R.attention(q, cache, layer, positions, kv_len, mask)

    def paged_kv_write(self, cache, layer, k, v, slot_mapping):
        return R.paged_kv_write(cache, layer, k, v, slot_mapping)

    auto_kv_cap_gib = 2.0

    def paged_attention(self, q, cache, layer, ctx):
        return R.paged_attention(q, cache, layer, ctx)

    def paged_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        return R.paged_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer)

    def hier_rope_kv_write(self, qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer):
        return R.hier_rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, ctx, cache, layer)

    def hier_attention(self, q, cache, layer, ctx, upper_only):
        return R.hier_attention(q, cache, layer, ctx, upper_only)
