"""w8a16: int8 symmetric per-channel weights, activations in the model dtype."""
from __future__ import annotations

from . import rtn
from .format import QuantizedWeight
from .linear import QuantLinear


class W8A16Linear(QuantLinear):
    scheme = "w8a16"
    weight_bits = 8

    @classmethod
    def quantize(cls, w, qcfg):
        return rtn.int8_per_channel(w, hadamard=getattr(qcfg, "hadamard", False))

    @classmethod
    def accepts(cls, w):
        return isinstance(w, QuantizedWeight) and w.bits == 8 and not w.is_fp8 and w.group_size == -1 and w.zero is None
