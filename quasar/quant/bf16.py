"""bf16: the unquantized linear (weights and activations in the model dtype)."""
from __future__ import annotations

import torch

from .linear import QuantLinear


class DenseLinear(QuantLinear):
    scheme = "bf16"
    weight_bits = 16

    def __init__(self, backend, weight, bias, dtype):
        super().__init__(backend, weight.to(device=backend.device, dtype=dtype), bias, dtype)

    @classmethod
    def quantize(cls, w, qcfg):
        return w

    @classmethod
    def accepts(cls, w):
        return isinstance(w, torch.Tensor)
