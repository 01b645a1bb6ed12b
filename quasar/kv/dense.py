"""The dense KV cache representation: in the model dtype, preallocated for max_seq_len, with a
batch dimension from day one.

Layout per layer is BNSD: k[layer] is [B, Hkv, S, D] (what both SDPA and Ascend's fused attention
take). `attention` receives the cache object, not bare tensors, so that other representations
(QuantSpec's hierarchical INT4 cache) can slot in behind the same op. The committed length is
kept by the scheduler; rejected draft slots are simply overwritten by the next step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DenseStep:
    """A dense-cache step's attention metadata: positions [B, T]; attend over slots [0, kv_len)."""
    positions: torch.Tensor
    kv_len: int
    mask: Optional[torch.Tensor] = None


class KVCache:
    representation = "dense"

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_seq_len: int,
                 head_dim: int, dtype: torch.dtype, device):
        shape = (num_layers, batch, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.batch = batch

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def prologue(self, backend, layer, qkv, q_norm, k_norm, eps, cos, sin, step: DenseStep):
        """qkv [B*T, W] -> q [B, T, H, D], the step's k/v written at their positions."""
        qkv = qkv.view(*step.positions.shape, -1)
        return backend.rope_kv_write(qkv, q_norm, k_norm, eps, cos, sin, step.positions, self, layer)

    def attend(self, backend, layer, q, step: DenseStep, draft: bool = False):
        return backend.attention(q, self, layer, step.positions, step.kv_len, step.mask)
